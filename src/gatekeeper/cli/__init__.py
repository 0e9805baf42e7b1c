"""The ``gatekeeper`` command: one module per command and the client of a running daemon.

Owns: ``main`` (the argument parser and ``serve``), ``check``, ``ruletest``
(``gatekeeper test``), ``plan`` (``plan`` and ``explain``), ``backtest`` (replaying the
recorded history against a ruleset), ``copydb`` (``copy-db``: a deployment's database
copied to another, ``gatekeeper.store.copy``), ``snapshot`` (the state they
read: a file or a running daemon), ``emit``, ``client`` (the
commands that talk to a running daemon: actions, rules, audit, export), ``output`` (what
``check``, ``test`` and ``plan`` print: problem lines, GitHub workflow commands, counts, paths).

May import: every room. Heavy rooms (``http``, ``runtime``) are imported only by the
commands that need them, so ``check``, ``test`` and ``plan`` start fast.
"""

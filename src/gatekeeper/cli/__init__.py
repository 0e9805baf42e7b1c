"""The ``gatekeeper`` command: one module per command and the client of a running daemon.

Owns: ``main`` (the argument parser and ``serve``), ``check``, ``ruletest``
(``gatekeeper test``), ``plan`` (``plan`` and ``explain``), ``emit``, ``client`` (the
commands that talk to a running daemon: actions, rules, audit, export), ``output`` (what
``check``, ``test`` and ``plan`` print: problem lines, GitHub workflow commands, counts).

May import: every room. Heavy rooms (``http``, ``runtime``) are imported only by the
commands that need them, so ``check``, ``test`` and ``plan`` start fast.
"""

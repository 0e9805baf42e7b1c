"""Pure evaluation: facts, approvals and admin acts in; decisions and queued actions out.
No I/O, no clock reads of its own (time is passed in), no ids of its own making beyond
those derived from its inputs.

Owns: ``core`` (the records the engine produces, ``FactTable`` and ``Engine``), ``ledger``
(escrow limits), ``deadlines`` (when a time-dependent rule must be looked at again).

May import: ``gatekeeper.rules``, ``gatekeeper.expr`` and the ground floor.
"""

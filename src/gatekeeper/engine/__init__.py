"""Pure evaluation: facts, approvals and admin acts in; decisions and queued actions out.
No I/O, no clock reads of its own (time is passed in); the ids of queued actions come from
an injected generator (``Engine(new_action_id=...)``), every other id is derived from the
inputs.

Owns: ``model`` (the records the engine takes and produces, shared by the rooms above:
``FactInput``, ``RuleState``, ``ApprovalInput``, ``AdminAct``, ``SignOff``, ``QueuedAction``,
``Decision``, ``IdempotencyRecord``, ``Transition``; ``InstanceKey`` and ``CausedBy``
for per-item rules and rules that set facts; ``Stand`` and ``Consumption`` for standing
approvals and the approvals firings use up), ``facts`` (``FactTable`` and
``ProjectFacts``, the current facts in memory), ``evaluate`` (``Engine``: a ruleset's
fact-key index and the planning of transitions; ``apply_transition``), ``ledger`` (escrow
limits), ``signoffs`` (the two-person rule for money rules: sign-offs by content hash and
the mode a rule runs in), ``deadlines`` (when a time-dependent rule instance must be looked
at again), ``replay`` (a recorded history replayed through an engine, in memory, as the
daemon drives it), ``backtest`` (the differences between recorded and replayed firings and
decisions, as pure functions over plain records).

May import: ``gatekeeper.rules``, ``gatekeeper.expr`` and the ground floor.
"""

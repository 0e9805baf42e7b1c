"""The two-person rule for money rules, and the mode a rule runs in.

A *money rule* is a rule with a ``release`` action. With ``money_rule_approvals: N`` (N > 0)
in gatekeeper.yaml, a money rule whose exact content hash has fewer than N distinct admin
sign-offs runs as if ``mode: shadow``: its effective mode is ``awaiting_signoff``. A
sign-off is of one content hash: any change to the rule makes a new hash, which needs its
own N sign-offs. Sign-offs only open the way for the next evaluation: a firing decided
while the rule awaited sign-off stays shadowed for good.

``SignOffBook`` is what the engine reads when it decides: N and the sign-offs recorded so
far by content hash. The runtime keeps one book per daemon and adds each sign-off once it
is committed, as it does with the escrow book.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gatekeeper.clock import format_rfc3339
from gatekeeper.engine.model import EffectiveMode, SignOff
from gatekeeper.rules.model import Rule

SignedOff = dict[str, dict[str, SignOff]]
"""content hash -> actor (an admin's token subject) -> their sign-off."""


def is_money_rule(rule: Rule) -> bool:
    """Whether ``rule`` moves money: it has a ``release`` action."""
    return rule.release is not None


@dataclass
class SignOffBook:
    """``required`` distinct sign-offs a money rule's content hash needs before it runs live
    (``money_rule_approvals``; 0: none) and the sign-offs recorded, by content hash.
    ``presumed`` holds content hashes taken as signed off without any: a backtest's
    candidate rules that no recorded history knows (what they would decide, live)."""

    required: int = 0
    signed: SignedOff = field(default_factory=dict)
    presumed: frozenset[str] = frozenset()

    def signed_by(self, content_hash: str) -> list[str]:
        """The admins who signed off ``content_hash``, sorted."""
        return sorted(self.signed.get(content_hash, {}))

    def missing(self, rule: Rule) -> int:
        """How many more sign-offs ``rule`` needs to run live (0 for a rule that is not a
        money rule, or when none are required)."""
        if self.required <= 0 or not is_money_rule(rule) or rule.content_hash in self.presumed:
            return 0
        return max(0, self.required - len(self.signed.get(rule.content_hash, {})))

    def add(self, signoff: SignOff) -> None:
        """Count a COMMITTED sign-off."""
        self.signed.setdefault(signoff.content_hash, {})[signoff.actor] = signoff


def effective_mode(rule: Rule, book: SignOffBook | None) -> EffectiveMode:
    """The mode ``rule`` runs in now: ``shadow`` when its file says ``mode: shadow``;
    ``awaiting_signoff`` when it is a money rule whose content hash lacks sign-offs
    (``book``; None: no sign-off is required); else ``live``."""
    if rule.mode == "shadow":
        return "shadow"
    if book is not None and book.missing(rule) > 0:
        return "awaiting_signoff"
    return "live"


def signoff_status(rule: Rule, book: SignOffBook) -> dict[str, Any] | None:
    """Where a money rule stands with its sign-offs (JSON-ready), or None for a rule that
    needs none (not a money rule, or ``money_rule_approvals`` 0): its content hash, the
    sign-offs required, how many more are needed (``missing``) and who signed off, by
    actor: ``{actor, at, comment}`` (``at`` RFC 3339, None when not known)."""
    if book.required <= 0 or not is_money_rule(rule):
        return None
    signed = book.signed.get(rule.content_hash, {})
    return {
        "content_hash": rule.content_hash,
        "required": book.required,
        "missing": book.missing(rule),
        "signed_by": [
            {
                "actor": actor,
                "at": None if signoff.at is None else format_rfc3339(signoff.at),
                "comment": signoff.comment,
            }
            for actor, signoff in sorted(signed.items())
        ],
    }

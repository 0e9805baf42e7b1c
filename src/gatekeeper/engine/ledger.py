"""The release ledger: what each escrow has committed, and whether a release still fits.

Every release that gatekeeper decides to send is recorded in the ledger in the same
transaction as the decision (its ``reserve`` movement), and from then on counts against its
escrow's limit, whatever its delivery does: while it is pending, once it is delivered (sent,
then settled), and also when it is a dead letter (a bank may have processed a request whose
answer was lost, so a dead release is treated as possibly paid until someone retries or
cancels it). Only a ``return`` gives the amount back: an admin cancelled the release before
it was sent, or the bank's settlement callback said it failed. A release that would take an
escrow past its limit, or is in another currency, is not sent: the decision is
``blocked``.

Amounts are ``Decimal`` throughout, parsed from decimal strings; never floats.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from gatekeeper.config import Escrow
from gatekeeper.rules.model import ReleaseAction


@dataclass(frozen=True)
class LedgerEntry:
    """One release recorded against an escrow (``amount`` a decimal string)."""

    release_id: str
    escrow: str
    amount: str
    currency: str
    payee: str
    rule_id: str
    firing_id: str
    recorded_at: str


@dataclass
class EscrowBook:
    """Escrow limits and the amounts committed so far, for deciding a release.

    ``committed`` maps escrow name to the sum of every release recorded against it and not
    returned (reserved + sent + settled).
    ``copy()`` gives a book to plan against without touching this one.
    """

    escrows: Mapping[str, Escrow]
    committed: dict[str, Decimal] = field(default_factory=dict)

    def copy(self) -> EscrowBook:
        return EscrowBook(self.escrows, dict(self.committed))

    def remaining(self, escrow: str) -> Decimal | None:
        """What is left of ``escrow``'s limit, or None for an escrow not configured."""
        account = self.escrows.get(escrow)
        if account is None:
            return None
        return account.limit - self.committed.get(escrow, Decimal(0))

    def refusal(self, release: ReleaseAction) -> str | None:
        """Why ``release`` cannot be sent now (a sentence), or None when it fits."""
        account = self.escrows.get(release.escrow)
        if account is None:
            return f"escrow {release.escrow!r} is not configured"
        if release.currency != account.currency:
            return (
                f"release is in {release.currency} but escrow {release.escrow!r} holds "
                f"{account.currency}"
            )
        amount = Decimal(release.amount)
        left = self.remaining(release.escrow)
        assert left is not None
        if amount > left:
            return (
                f"release of {amount} {release.currency} exceeds what is left of escrow "
                f"{release.escrow!r}: {left} of {account.limit} {account.currency}"
            )
        return None

    def refusal_of_all(self, releases: Iterable[ReleaseAction]) -> str | None:
        """Why the releases of one firing cannot all be sent (checked in order, each on top
        of the ones before it), or None when they all fit. A firing is all or nothing."""
        trial = self.copy()
        for release in releases:
            reason = trial.refusal(release)
            if reason is not None:
                return reason
            trial.commit(release.escrow, release.amount)
        return None

    def commit(self, escrow: str, amount: str) -> None:
        """Count ``amount`` (a decimal string) against ``escrow``."""
        self.committed[escrow] = self.committed.get(escrow, Decimal(0)) + Decimal(amount)

    def give_back(self, escrow: str, amount: str) -> None:
        """A ``return`` movement: ``amount`` (a decimal string) no longer counts against
        ``escrow`` (a cancelled or failed release)."""
        self.committed[escrow] = self.committed.get(escrow, Decimal(0)) - Decimal(amount)

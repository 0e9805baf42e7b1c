"""The release ledger: what each escrow has committed, and whether a release still fits.

Every release that gatekeeper decides to send is recorded in the ledger in the same
transaction as the decision (its ``reserve`` movement), and from then on counts against its
escrow's limit, whatever its delivery does: while it is pending, once it is delivered (sent,
then settled), and also when it is a dead letter (a bank may have processed a request whose
answer was lost, so a dead release is treated as possibly paid until someone retries or
cancels it). Only a ``return`` gives the amount back: an admin cancelled the release before
it was sent, or the bank's settlement callback said it failed. A ``reclaim`` takes it back
out (``commit``): the bank settled a cancelled release anyway, whatever the limit. A
release that would take an escrow past its limit, or is in another currency, is not sent:
the decision is ``blocked``.

Amounts are ``Decimal`` throughout, parsed from decimal strings; never floats. A release
whose amount is read from a fact when it fires (``amount: "${item.data.amount}"``) is
checked by ``checked_amount`` first: a decimal amount, positive, within the escrow's
precision and the release's ``max_amount``. An escrow's precision (``Escrow.decimals``, 0 for
JPY, 2 by default, up to 8) bounds the decimals of every amount released from it, and its
figures are shown with that many (``format_amount``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

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
        places = decimal_places(amount)
        if places > account.decimals:
            return (
                f"release of {release.amount} {release.currency} has {places} decimals, more "
                f"than escrow {release.escrow!r}'s {account.decimals}"
            )
        left = self.remaining(release.escrow)
        assert left is not None
        if amount > left:
            shown = format_amount(left, account.decimals)
            limit = format_amount(account.limit, account.decimals)
            return (
                f"release of {amount} {release.currency} exceeds what is left of escrow "
                f"{release.escrow!r}: {shown} of {limit} {account.currency}"
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


def decimal_places(amount: Decimal) -> int:
    """How many decimals ``amount`` is written with (``Decimal("12.50")``: 2, ``"500"``:
    0); trailing zeros count, as the text had them."""
    exponent = amount.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def format_amount(amount: Decimal, decimals: int) -> str:
    """``amount`` as a decimal string with an escrow's precision, ``decimals`` places
    (``Decimal("500")``, 2: ``"500.00"``; ``Decimal("1500.00")``, 0: ``"1500"``); exact: an
    amount with more significant decimals (recorded before the precision was lowered)
    keeps them (``Decimal("10.50")``, 0: ``"10.5"``), never rounded."""
    places = max(decimals, decimal_places(amount.normalize()))
    return f"{amount:.{places}f}"


DECIMAL_AMOUNT = re.compile(r"[0-9]+(\.[0-9]+)?")
"""A decimal amount as a fact may give it: ASCII digits, optionally a point and decimals
(no sign, exponent, spaces or thousands separators)."""


def checked_amount(value: Any, *, max_amount: str, decimals: int) -> str:
    """The release amount ``value`` (a fact field's JSON value) as a decimal string, when it
    may be released: a string of ``DECIMAL_AMOUNT`` or an integer, above zero, with at most
    ``decimals`` decimals (the escrow's precision) and at most ``max_amount`` (a decimal
    string). The amount is kept as the fact wrote it (``"120.5"`` stays ``"120.5"``).

    Raises ``ValueError`` saying what is wrong (without the value: the caller shows it),
    e.g. ``not a decimal amount (digits, a point and at most 2 decimals, e.g. "1500.00")``.
    A JSON number with a fraction is refused: amounts are decimal strings, never floats."""
    shown = format_amount(Decimal(1500), decimals)
    example = (
        f'(digits, a point and at most {decimals} decimals, e.g. "{shown}")'
        if decimals
        else f'(digits only, no decimals, e.g. "{shown}")'
    )
    if isinstance(value, bool) or not isinstance(value, str | int):
        if isinstance(value, float):
            raise ValueError(f"a JSON number, not a decimal string {example}")
        raise ValueError(f"not a decimal amount {example}")
    text = str(value)
    if text.startswith("-") and DECIMAL_AMOUNT.fullmatch(text[1:]):
        raise ValueError("not above zero")
    if not DECIMAL_AMOUNT.fullmatch(text):
        raise ValueError(f"not a decimal amount {example}")
    amount = Decimal(text)
    if amount <= 0:
        raise ValueError("not above zero")
    _, _, fraction = text.partition(".")
    if len(fraction) > decimals:
        raise ValueError(f"{len(fraction)} decimals, more than the escrow's {decimals}")
    if amount > Decimal(max_amount):
        raise ValueError(f"above the release's max_amount {max_amount}")
    return text

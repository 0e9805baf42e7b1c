"""API tokens: bearer tokens checked against the SHA-256 hashes in ``gatekeeper.yaml``.

A token is a random string (``gk_`` + 43 URL-safe characters, 256 bits) handed out once by
``gatekeeper token new``; the config keeps only ``sha256(token)`` in hex, with the token's
subject (who holds it), scopes (``facts:write``, ``approve``, ``read``, ``admin``,
``history``: the fact log and decision log of its projects, which ``admin`` reads too; see
``grants``) and the projects it may act on. A presented token is hashed and compared with
every configured hash in constant time (``hmac.compare_digest``, no early exit), so timing
reveals nothing about which hash came close. Tokens never appear in logs, the audit log or
error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable

from gatekeeper.config import Token

TOKEN_PREFIX = "gk_"
SCOPES = ("facts:write", "approve", "read", "admin", "history")
GRANTED_ALSO_BY = {"history": "admin"}
"""A scope a route needs -> the other scope that grants it too (an admin reads the
history)."""


def grants(scopes: frozenset[str], needed: str) -> bool:
    """Whether a token of ``scopes`` may use a route that needs scope ``needed``."""
    return needed in scopes or GRANTED_ALSO_BY.get(needed) in scopes


def new_token() -> str:
    """A fresh random token (``gk_`` + 256 bits, URL-safe base64)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The SHA-256 of ``token`` as lowercase hex: what ``gatekeeper.yaml`` stores."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750), or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(tokens: Iterable[Token], presented: str | None) -> Token | None:
    """The configured token matching ``presented``, or None. Constant time in which
    configured token matches: every hash is compared."""
    if presented is None:
        return None
    digest = hash_token(presented).encode()
    found = None
    for token in tokens:
        if hmac.compare_digest(digest, token.sha256.encode()):
            found = token
    return found


def config_entry(subject: str, token: str, scopes: Iterable[str], projects: Iterable[str]) -> str:
    """The ``tokens:`` entry of ``gatekeeper.yaml`` for ``token`` (its hash, never itself)."""
    scope_list = ", ".join(scopes)
    project_list = ", ".join(json.dumps(p) for p in projects)  # "*" must be quoted in YAML
    return (
        f"  - {{subject: {subject}, sha256: {hash_token(token)}, "
        f"scopes: [{scope_list}], projects: [{project_list}]}}"
    )

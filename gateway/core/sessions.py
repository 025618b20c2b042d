"""Console sessions: what a signed cookie carries, and the CSRF tokens derived from it.

A cookie is ``<payload>.<mac>``: the payload is base64url JSON, the MAC an HMAC-SHA256 of it under
the console's secret. It never holds a key, nor a key's SHA-256 (which would let a weak key be
guessed offline): the key is named by ``key_ref``, an HMAC of its SHA-256 under the same secret,
and looked up in the live config on every request, so removing or expiring a key ends its
sessions at once. A new secret (a restart, by default) ends every session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Literal

SESSION_S = 8 * 3600
Role = Literal["team", "admin"]


@dataclass(frozen=True, slots=True)
class Session:
    role: Role
    key_ref: str  # key_ref() of the key that signed in
    issued_at: float
    sid: str  # random per sign-in; the CSRF token derives from it


def key_ref(secret: bytes, sha256: str) -> str:
    """How a session names its key without revealing the key or its hash."""
    return _mac(secret, "key", sha256)[:32]


def new_session(secret: bytes, role: Role, key_sha256: str, now: float) -> Session:
    return Session(role, key_ref(secret, key_sha256), now, secrets.token_urlsafe(16))


def seal(secret: bytes, session: Session) -> str:
    """The cookie value of ``session``."""
    fields = {"r": session.role, "k": session.key_ref, "t": session.issued_at, "s": session.sid}
    return _signed(secret, "session", json.dumps(fields, separators=(",", ":")))


def unseal(secret: bytes, value: str, now: float) -> Session | None:
    """The session a cookie holds, or None if it is forged, damaged, or older than 8 h."""
    text = _verified(secret, "session", value)
    if text is None:
        return None
    try:
        fields = json.loads(text)
        session = Session(fields["r"], fields["k"], float(fields["t"]), fields["s"])
    except (ValueError, TypeError, KeyError):
        return None
    if session.role not in ("team", "admin") or not 0 <= now - session.issued_at < SESSION_S:
        return None
    return session


def signin_nonce(secret: bytes) -> tuple[str, str]:
    """A fresh sign-in form's cookie value and its matching form token (login CSRF)."""
    nonce = secrets.token_urlsafe(16)
    return _signed(secret, "signin", nonce), csrf_token(secret, "signin:" + nonce)


def signin_token(secret: bytes, cookie: str | None) -> str | None:
    """The form token that goes with a sign-in cookie, or None if the cookie is not ours."""
    nonce = _verified(secret, "signin", cookie or "")
    return None if nonce is None else csrf_token(secret, "signin:" + nonce)


def csrf_token(secret: bytes, sid: str) -> str:
    return _mac(secret, "csrf", sid)[:43]


def same_token(expected: str | None, given: str | None) -> bool:
    return (
        expected is not None
        and given is not None
        and hmac.compare_digest(expected.encode(), given.encode())
    )


def link_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _signed(secret: bytes, purpose: str, text: str) -> str:
    payload = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
    return f"{payload}.{_mac(secret, purpose, payload)}"


def _verified(secret: bytes, purpose: str, value: str) -> str | None:
    payload, _, mac = value.partition(".")
    if not payload or not same_token(_mac(secret, purpose, payload), mac):
        return None
    try:
        return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    except (binascii.Error, ValueError):
        return None


def _mac(secret: bytes, purpose: str, text: str) -> str:
    digest = hmac.new(secret, f"{purpose}\n{text}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")

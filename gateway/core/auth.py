"""Who is calling: keys are known only by their SHA-256, looked up once per request."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Generic, TypeVar

from gateway.core.config import KeyConfig, TeamConfig
from gateway.core.errors import Unauthorized

KEY_PREFIX = "igw_"
OPENAI_KEY_PREFIX = ("sk-", "sk_")  # OpenAI's keys, and the upstream's central one
KEY_BYTES = 24  # 192 bits
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 512

T = TypeVar("T")


def new_team_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def plausible_key(text: str) -> str | None:
    """Why ``text`` cannot be a key (None if it can): what ``hash-key`` refuses to hash."""
    if not MIN_KEY_CHARS <= len(text) <= MAX_KEY_CHARS:
        return f"a key is {MIN_KEY_CHARS} to {MAX_KEY_CHARS} characters, this is {len(text)}"
    if not text.isascii() or not text.isprintable() or any(ch.isspace() for ch in text):
        return "a key is printable ASCII without spaces (a stray newline or quote?)"
    return None


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class KeyIndex(Generic[T]):
    """Maps key digests to what they unlock.

    The lookup is by the digest of the presented key, so its timing depends on a hash the caller
    cannot steer, never on how much of a real key they guessed: a constant-time comparison of
    the key itself, without leaking which prefix matched.
    """

    def __init__(self, owners: Iterable[tuple[str, T]]) -> None:
        self._by_digest: dict[str, T] = dict(owners)

    @classmethod
    def for_teams(cls, teams: Mapping[str, TeamConfig]) -> KeyIndex[KeyConfig]:
        return KeyIndex((key.sha256, key) for team in teams.values() for key in team.all_keys())

    def entries(self) -> list[tuple[str, T]]:
        """Every (digest, owner) pair, for lookups by something derived from the digest."""
        return list(self._by_digest.items())

    def owner(self, key: str | None) -> T | None:
        if key is None:
            return None
        return self._by_digest.get(key_digest(key))

    def require(self, authorization: str | None) -> T:
        """The owner of the bearer key in ``authorization``, or raise 401."""
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized(
                "Missing API key: send 'Authorization: Bearer <team key>'.", code="missing_api_key"
            )
        owner = self.owner(token)
        if owner is None:
            hint = ""
            if token.startswith(OPENAI_KEY_PREFIX):
                hint = (
                    " This looks like an OpenAI or upstream key (sk-...); this gateway expects "
                    f"your team's gateway key ({KEY_PREFIX}...), from your gateway admin."
                )
            raise Unauthorized("Incorrect API key provided." + hint)
        return owner


def check_expiry(key: KeyConfig, now: datetime) -> None:
    """401 ``key_expired`` once a key's expiry has passed (named with its date, never the key)."""
    if key.expires is not None and now >= key.expires:
        raise Unauthorized(
            f"This API key ({key.identity}) expired at {key.expires.isoformat()}; ask your "
            "admin for a new one.",
            code="key_expired",
        )

"""Who is calling: team keys are known only by their SHA-256, looked up once per request."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping

from gateway.config import TeamConfig
from gateway.errors import Unauthorized

KEY_PREFIX = "igw_"
KEY_BYTES = 24  # 192 bits


def new_team_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class KeyIndex:
    """Maps key digests to names.

    The lookup is by the digest of the presented key, so its timing depends on a hash the caller
    cannot steer, never on how much of a real key they guessed: a constant-time comparison of
    the key itself, without leaking which prefix matched.
    """

    def __init__(self, owners: Iterable[tuple[str, str]]) -> None:
        self._by_digest: dict[str, str] = dict(owners)

    @classmethod
    def for_teams(cls, teams: Mapping[str, TeamConfig]) -> KeyIndex:
        return cls((digest, team.name) for team in teams.values() for digest in team.keys_sha256)

    def owner(self, key: str | None) -> str | None:
        if key is None:
            return None
        return self._by_digest.get(key_digest(key))

    def require(self, authorization: str | None) -> str:
        """The owner of the bearer key in ``authorization``, or raise 401."""
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized(
                "Missing API key: send 'Authorization: Bearer <team key>'.", code="missing_api_key"
            )
        owner = self.owner(token)
        if owner is None:
            raise Unauthorized("Incorrect API key provided.")
        return owner

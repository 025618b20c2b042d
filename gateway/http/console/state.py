"""The console's per-process state: its signing secret, the sign-in throttle, the one-time
sign-in links, and who a session belongs to under the config in force."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from gateway.core.config import AdminKey, ConsoleConfig, KeyConfig, SignInLink
from gateway.core.live import Snapshot
from gateway.core.sessions import Role, key_ref
from gateway.http.console.throttle import SignInThrottle

SECRET_BYTES = 32
PAGES_AT_ONCE = 2  # pages computed at the same time; more wait their turn (the API goes first)


@dataclass(frozen=True, slots=True)
class Holder:
    """The key behind a session, as the live config has it now."""

    role: Role
    sha256: str
    key: KeyConfig | None  # a team key
    name: str  # the key's identity, or the admin key's name


class ConsoleState:
    def __init__(self, secret: bytes, links: Iterable[SignInLink], css: bytes) -> None:
        self.secret = secret
        self.css = css
        self.throttle = SignInThrottle()
        # A page sums a team's period (tens of ms of CPU with 10,000 entries): however often
        # someone reloads, at most this many are computed at once, beside the paid requests.
        self.pages = asyncio.Semaphore(PAGES_AT_ONCE)
        self._links = {link.token_sha256: link.key_sha256 for link in links}
        self._holders: tuple[Snapshot, dict[str, Holder]] | None = None

    @classmethod
    def of(cls, config: ConsoleConfig, css: bytes) -> ConsoleState:
        """A configured ``secret_file`` (shared by a fleet), else a random secret: a restart
        then ends every session."""
        secret = (
            config.secret.reveal().encode()
            if config.secret is not None
            else secrets.token_bytes(SECRET_BYTES)
        )
        return cls(secret, config.links, css)

    def holder(self, snapshot: Snapshot, ref: str) -> Holder | None:
        """Whose key ``ref`` names in ``snapshot``, or None once it is gone from the config."""
        if self._holders is None or self._holders[0] is not snapshot:
            self._holders = (snapshot, self._index(snapshot))
        return self._holders[1].get(ref)

    def use_link(self, token_sha256: str) -> str | None:
        """The key a one-time link signs in as, once; None for an unknown or used link."""
        return self._links.pop(token_sha256, None)

    def _index(self, snapshot: Snapshot) -> dict[str, Holder]:
        found = {
            key_ref(self.secret, digest): Holder("team", digest, key, key.identity)
            for digest, key in snapshot.team_keys.entries()
        }
        for digest, admin in snapshot.admin_keys.entries():
            found[key_ref(self.secret, digest)] = Holder("admin", digest, None, admin_name(admin))
        return found


def admin_name(key: AdminKey) -> str:
    """The name an admin key acts under: shown in the console, and the actor its resolutions
    record (as the admin API records it)."""
    return key.identity


CONSOLE = web.AppKey("console", ConsoleState)

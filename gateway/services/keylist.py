"""The ``keys`` listing: every key of every team as admins look for it (never the key itself)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.core.config import Settings
from gateway.core.money import units_to_cny
from gateway.core.tables import aligned
from gateway.services.usage import rfc3339


def key_listing(
    settings: Settings, now: datetime, last_used: dict[str, float]
) -> list[dict[str, Any]]:
    """Identity, fingerprint (first 8 hex of its sha256), expiry, caps and last use per key."""
    listing = []
    for team in settings.teams.values():
        for key in team.all_keys():
            used = last_used.get(key.fingerprint)
            listing.append(
                {
                    "key": key.identity,
                    "team": team.name,
                    "name": key.name,
                    "fingerprint": key.sha256[:8],
                    "expires": key.expires.isoformat() if key.expires else None,
                    "expired": key.expires is not None and now >= key.expires,
                    "budget_cny": units_to_cny(key.budget) if key.budget is not None else None,
                    "rpm": key.rpm,
                    "max_concurrent": key.max_concurrent,
                    "last_used": rfc3339(used) if used is not None else None,
                }
            )
    return listing


def format_keys(listing: list[dict[str, Any]]) -> str:
    header = ("key", "fingerprint", "expires", "budget", "rpm", "concurrent", "last_used")
    rows = [header]
    for k in listing:
        expires = k["expires"] or "-"
        rows.append(
            (
                k["key"],
                k["fingerprint"],
                f"{expires} (EXPIRED)" if k["expired"] else expires,
                "-" if k["budget_cny"] is None else f"{k['budget_cny']:.4f}",
                str(k["rpm"] or "-"),
                str(k["max_concurrent"] or "-"),
                k["last_used"] or "never",
            )
        )
    return aligned(rows)

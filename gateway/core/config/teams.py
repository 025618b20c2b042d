"""``[teams.NAME]`` with their keys, and ``[admin]``'s keys: each known by its SHA-256, each
hash in one place only."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

from gateway.core.config.settings import AdminKey, KeyConfig, Settings, TeamConfig
from gateway.core.config.table import Table, at_least_one, cny_amount, positive
from gateway.core.ledger import GATEWAY_ACTOR
from gateway.core.normalize import FormatSetting
from gateway.core.periods import PERIOD_KINDS

RESPONSE_FORMATS: tuple[FormatSetting, ...] = ("url", "b64_json", "auto")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
PLACEHOLDER_SHA256 = "0" * 64  # the example config's: never a real key
KEY_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def parse_teams(t: Table) -> dict[str, TeamConfig]:
    teams = {}
    for name in t.data:
        team = t.table(name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            t.errors.append(f"{team.path}: team names are 1-64 letters, digits, _ . -")
        period = team.choice("period", PERIOD_KINDS, "monthly")
        fmt = team.choice("default_response_format", RESPONSE_FORMATS, "auto")
        budget = cny_amount(team, "budget_cny", team.get_either("budget_cny", (float, str), 0.0))
        named = _named_keys(team, name, budget)
        teams[name] = TeamConfig(
            name=name,
            keys_sha256=parse_key_hashes(team, "keys_sha256", required=not named),
            budget=budget,
            period=period,
            rpm=team.get("rpm", int, None, at_least_one),
            max_concurrent=team.get("max_concurrent", int, None, at_least_one),
            default_response_format=fmt,
            keys=named,
            keep_days=team.get("keep_days", float, None, positive),
            reuse_identical_s=team.get("reuse_identical_s", float, None, positive),
        )
        if "budget_cny" not in team.data:
            t.errors.append(f"{team.name('budget_cny')} is required")
        team.finish()
    return teams


def _named_keys(team: Table, team_name: str, team_budget: int) -> tuple[KeyConfig, ...]:
    """``[[teams.<team>.keys]]``: name, sha256 and optional expires, budget_cny, rpm,
    max_concurrent, each checked."""
    items = team.get("keys", list, [])
    keys: list[KeyConfig] = []
    for index, item in enumerate(items):
        entry = Table(item, f"{team.name('keys')}[{index}]", team.errors)
        name = _key_name(entry)
        if name is not None and any(k.name == name for k in keys):
            team.errors.append(f"{entry.name('name')}: the name {name!r} is used twice")
        digest = _key_digest(entry)
        budget = None
        if "budget_cny" in entry.data:
            budget = cny_amount(
                entry, "budget_cny", entry.get_either("budget_cny", (float, str), 0.0)
            )
            if budget > team_budget:
                team.errors.append(
                    f"{entry.name('budget_cny')} is above the team's budget_cny: a key's cap "
                    "lives inside its team's budget"
                )
        keys.append(
            KeyConfig(
                team=team_name,
                sha256=digest or "",
                name=name,
                expires=_expiry(entry),
                budget=budget,
                rpm=entry.get("rpm", int, None, at_least_one),
                max_concurrent=entry.get("max_concurrent", int, None, at_least_one),
            )
        )
        entry.finish()
    return tuple(k for k in keys if k.sha256)


def _expiry(entry: Table) -> datetime | None:
    """A TOML offset date-time, or a date (expiring at its midnight, UTC)."""
    entry.seen.add("expires")
    value = entry.data.get("expires")
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            entry.errors.append(
                f"{entry.name('expires')} needs a time zone offset (such as "
                "2027-03-31T00:00:00Z), or write a date: 2027-03-31"
            )
            return None
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    entry.errors.append(
        f"{entry.name('expires')} must be a TOML date or offset date-time (unquoted, such as "
        f"2027-03-31 or 2027-03-31T00:00:00Z), got {type(value).__name__}"
    )
    return None


def parse_key_hashes(t: Table, key: str, *, required: bool) -> tuple[str, ...]:
    values = t.get(key, list, [])
    if required and not values:
        t.errors.append(f"{t.name(key)} must list at least one key hash")
    good = []
    for index, value in enumerate(values):
        if isinstance(value, str) and SHA256_HEX.fullmatch(value):
            good.append(value)
        else:
            t.errors.append(
                f"{t.name(key)}[{index}] must be 64 lowercase hex characters "
                "(the sha256 of a key; `image-gateway new-key` prints one)"
            )
    return tuple(good)


def parse_admin_keys(admin: Table) -> tuple[AdminKey, ...]:
    """``[[admin.keys]]``: a name (as team key names) and a sha256 each."""
    keys: list[AdminKey] = []
    for index, item in enumerate(admin.get("keys", list, [])):
        entry = Table(item, f"{admin.name('keys')}[{index}]", admin.errors)
        name = _key_name(entry)
        if name == GATEWAY_ACTOR:
            admin.errors.append(
                f"{entry.name('name')}: {name!r} names the gateway's own resolutions"
            )
        elif name is not None and any(k.name == name for k in keys):
            admin.errors.append(f"{entry.name('name')}: the name {name!r} is used twice")
        digest = _key_digest(entry)
        if digest is not None and name is not None:
            keys.append(AdminKey(digest, name))
        entry.finish()
    return tuple(keys)


def _key_name(entry: Table) -> str | None:
    """A key's ``name`` (team and admin keys alike), or None with the error said."""
    name = entry.get("name", str, None)
    if name is None or not KEY_NAME.fullmatch(name):
        entry.errors.append(
            f"{entry.name('name')} is required: 1-63 of a-z 0-9 _ . - (starting with a "
            "letter or digit)"
        )
        return None
    return name


def _key_digest(entry: Table) -> str | None:
    """A key's ``sha256``, or None with the error said."""
    digest = entry.get("sha256", str, None)
    if digest is None or not SHA256_HEX.fullmatch(digest):
        entry.errors.append(
            f"{entry.name('sha256')} must be 64 lowercase hex characters (`image-gateway "
            "hash-key` prints it)"
        )
        return None
    return digest


def check_unique_keys(settings: Settings, errors: list[str]) -> None:
    """A key hash belongs to one place, and the example's all-zero placeholder to none."""
    owner: dict[str, str] = {}
    for team in settings.teams.values():
        listed = [(d, "keys_sha256") for d in team.keys_sha256]
        for digest, where in [*listed, *((k.sha256, f"keys.{k.name}") for k in team.keys)]:
            if digest == PLACEHOLDER_SHA256:
                errors.append(
                    f"teams.{team.name}.{where}: the all-zero hash is the example's placeholder; "
                    "put a real key's hash (`image-gateway new-key`)"
                )
            if digest in owner:
                errors.append(
                    f"teams.{team.name}.{where}: key hash {digest[:12]}... is also used by "
                    f"{owner[digest]}"
                )
            owner.setdefault(digest, f"teams.{team.name}.{where}")
    for key in settings.all_admin_keys():
        where = f"admin.keys.{key.name}" if key.name else "admin.keys_sha256"
        if key.sha256 in owner:
            used = owner[key.sha256]
            errors.append(f"{where}: key hash {key.sha256[:12]}... is also used by {used}")
        owner.setdefault(key.sha256, where)

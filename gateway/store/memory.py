"""The in-memory engine: the SQLite engine's named statements, answered in Python.

For tests of the services above the store: they run the same scripts as on a database, with
nothing to open, migrate or clean up. Nothing is durable, so no configuration selects it.
``MemoryDatabase`` holds the tables and has one method per statement of
``sql/sqlite/queries.sql`` (its opening statements aside), and it does what the schema's
triggers and constraints do: the reservation's budget checks and counter moves, a settlement
or resolution capped by its hold, settled and resolved once, the counters moved by each.
Like SQLite it belongs to one process (``shared`` is False). Rows are dicts, replaced and
never changed in place, so an atomic script's snapshot is a copy of each table.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from gateway.core.errors import StorageUnavailable
from gateway.core.periods import local_day
from gateway.store import migrations
from gateway.store.base import NEVER, Refused
from gateway.store.engine import Script, Step, drive

T = TypeVar("T")
Row = dict[str, Any]
COUNTERS = ("spent", "reserved", "uncertain", "overrun")
ZERO: Row = dict.fromkeys(COUNTERS, 0)


class MemoryEngine:
    """Runs the store's scripts against a ``MemoryDatabase``; see the module docstring."""

    shared = False
    instance_id = "local"
    lease_s = 0.0
    failures = 0

    def __init__(self, database: MemoryDatabase | None = None) -> None:
        self.created = database is None or database.fresh
        self.database = database if database is not None else MemoryDatabase()
        self.database.fresh = False
        self.closed = False

    async def read(self, script: Script[T]) -> T:
        await self.check_ready()
        return await drive(script, self._step)

    async def write(self, script: Script[T], *, atomic: bool = False, defer: bool = False) -> T:
        await self.check_ready()
        before = self.database.snapshot() if atomic else None
        try:
            return await drive(script, self._step)
        except BaseException:
            if before is not None:
                self.database = before
            raise

    async def check_ready(self) -> None:
        """Closed, it cannot be used (as a closed database); else as with a database, the
        caller lets others run first."""
        if self.closed:
            raise StorageUnavailable("The gateway's in-memory database is closed.")
        await asyncio.sleep(0)

    async def close(self) -> None:
        self.closed = True

    async def _step(self, step: Step) -> Any:
        """The statement's method; a script runs whole between two turns of the event loop."""
        answer = getattr(self.database, step.query)(**step.params)
        if step.want == "one":
            return answer[0] if answer else None
        return answer


class MemoryDatabase:
    """The tables, and one method per named statement (rows for a query, else rows changed).

    Keep one across two engines to restart a gateway on the same ledger.
    """

    def __init__(self) -> None:
        self.fresh = True
        self.holds: dict[str, Row] = {}
        self.settlements: dict[str, Row] = {}
        self.resolutions: dict[str, Row] = {}
        self.resolution_log: dict[str, float] = {}
        self.tasks: dict[str, Row] = {}
        self.task_of: dict[str, str] = {}  # request_id -> task_id
        self.idempotency: dict[tuple[str, str], Row] = {}
        self.counters: dict[tuple[str, str], Row] = {}  # the usage table
        self.key_counters: dict[tuple[str, str, str], Row] = {}  # the key_usage table
        self.expiries: dict[str, Row] = {}
        self.corrections: dict[str, tuple[Row, ...]] = {}  # by request, oldest first
        self.meta: dict[str, str] = _migrated()
        self.result_index: dict[tuple[str, int], Row] = {}  # by (request_id, position)

    def snapshot(self) -> MemoryDatabase:
        copied = copy.copy(self)
        for name, table in vars(self).items():
            if isinstance(table, dict):
                setattr(copied, name, dict(table))
        return copied

    # -- money -------------------------------------------------------------------------------

    def reserve(self, *, instance_id: str, **hold: Any) -> list[Row]:
        """The hold's trigger: both budgets checked, then the amount reserved, or nothing."""
        request_id, team, period, amount = (
            hold[k] for k in ("request_id", "team", "period", "amount")
        )
        if request_id in self.holds:
            raise Refused("UNIQUE constraint failed: holds.request_id")
        if (
            hold["n"] < 1
            or amount < 0
            or hold["unit_price"] < 0
            or hold["mode"] not in ("sync", "async")
        ):
            raise Refused("CHECK constraint failed: holds")
        team_key, key = (team, period), (team, hold["key_fp"], period)
        if _committed(self.counters.get(team_key, ZERO)) + amount > hold["budget"]:
            raise Refused("budget_exceeded")
        key_budget = hold["key_budget"]
        key_committed = _committed(self.key_counters.get(key, ZERO))
        if (
            hold["key_fp"] is not None
            and key_budget is not None
            and key_committed + amount > key_budget
        ):
            raise Refused("key_budget_exceeded")
        self.holds[request_id] = {**hold, "instance_id": None}
        self._move(hold, reserved=amount)
        return [self.counters[team_key]]

    def usage(self, *, team: str, period: str) -> list[Row]:
        return [self.counters[(team, period)]] if (team, period) in self.counters else []

    def key_usage(self, *, team: str, key_fp: str, period: str) -> list[Row]:
        key = (team, key_fp, period)
        return [self.key_counters[key]] if key in self.key_counters else []

    def settle(self, *, request_id: str, settled_at: float, **s: Any) -> int:
        """The settlement's triggers: capped by its hold, then the hold's amount moved out of
        reserved into spent (with the overrun) or uncertain; once per hold."""
        hold = self.holds.get(request_id)
        if hold is None:
            return 0
        state, amount, overrun = s["state"], s["amount"], s["overrun"]
        if (
            amount > hold["amount"]
            or s["images"] > hold["n"]
            or (state == "released" and (amount or overrun))
            or (state == "uncertain" and (amount != hold["amount"] or overrun))
            or (overrun > 0 and request_id not in self.task_of)
        ):
            raise Refused("settlement_above_hold")
        if request_id in self.settlements:
            return 0
        self.settlements[request_id] = {**s, "request_id": request_id, "settled_at": settled_at}
        captured = state == "captured"
        self._move(
            hold,
            reserved=-hold["amount"],
            spent=amount + overrun if captured else 0,
            uncertain=amount if state == "uncertain" else 0,
            overrun=overrun,
        )
        return 1

    def resolve(self, *, request_id: str, **r: Any) -> int:
        """The resolution's triggers: of an uncertain settlement only, capped by it, then its
        amount moved out of uncertain (into spent if captured); once per settlement."""
        settled = self.settlements.get(request_id)
        if settled is None or settled["state"] != "uncertain":
            raise Refused("not_uncertain")
        hold = self.holds[request_id]
        state, amount, overrun, images = r["state"], r["amount"], r["overrun"], r["images"]
        if (
            amount > settled["amount"]
            or images > hold["n"]
            or (state == "released" and (amount or overrun or images))
            or (overrun > 0 and request_id not in self.task_of)
        ):
            raise Refused("resolution_above_hold")
        if not r["reason"].strip(" ") or not 0 < len(r["actor"]) <= 64:
            raise Refused("CHECK constraint failed: resolutions")
        if request_id in self.resolutions:
            return 0
        self.resolutions[request_id] = {**r, "request_id": request_id}
        spent = amount + overrun if state == "captured" else 0
        self._move(hold, uncertain=-settled["amount"], spent=spent, overrun=overrun)
        return 1

    def insert_correction(self, *, request_id: str, **c: Any) -> int:
        """The correction's triggers: of a closed entry only (settled, not left uncertain),
        never beyond the images held, then its amount counted in spent."""
        settled = self.settlements.get(request_id)
        resolution = self.resolutions.get(request_id)
        if settled is None or (settled["state"] == "uncertain" and resolution is None):
            raise Refused("not_closed")
        if not c["reason"].strip(" ") or c["images"] < 0 or c["amount"] < 0:
            raise Refused("CHECK constraint failed: corrections")
        if not (c["images"] > 0 or c["amount"] > 0):
            raise Refused("CHECK constraint failed: corrections")
        charged = resolution["images"] if resolution is not None else settled["images"]
        earlier = self.corrections.get(request_id, ())
        hold = self.holds[request_id]
        if c["images"] + charged + sum(e["images"] for e in earlier) > hold["n"]:
            raise Refused("correction_above_hold")
        self.corrections[request_id] = (*earlier, c)
        self._move(hold, spent=c["amount"])
        return 1

    def lock_entry(self, *, request_id: str) -> list[Row]:
        return [{"locked": 1}]  # one process, one script at a time: serialized already

    def log_resolution(self, *, request_id: str, logged_at: float) -> int:
        if request_id not in self.resolutions:
            raise Refused("FOREIGN KEY constraint failed")
        if request_id in self.resolution_log:
            return 0
        self.resolution_log[request_id] = logged_at
        return 1

    def insert_expiry(self, *, request_id: str, actor: str, expired_at: float) -> int:
        if request_id not in self.settlements:
            raise Refused("FOREIGN KEY constraint failed")
        if request_id in self.expiries:
            raise Refused("UNIQUE constraint failed: expiries.request_id")
        if not 0 < len(actor) <= 64:
            raise Refused("CHECK constraint failed: expiries")
        self.expiries[request_id] = {"actor": actor, "expired_at": expired_at, "logged_at": None}
        return 1

    def claim_expiry_log(self, *, request_id: str, logged_at: float) -> int:
        expiry = self.expiries.get(request_id)
        if expiry is None or expiry["logged_at"] is not None:
            return 0
        self.expiries[request_id] = {**expiry, "logged_at": logged_at}
        return 1

    def unlogged_expiries(self) -> list[Row]:
        waiting = [(rid, e) for rid, e in self.expiries.items() if e["logged_at"] is None]
        waiting.sort(key=lambda item: item[1]["expired_at"])
        return [{**self.ledger(rid), "expired_by": e["actor"]} for rid, e in waiting]

    def hold_instance_gone(self, *, request_id: str, lease_s: float, instance_id: str) -> list[Row]:
        return [{"gone": 0}]  # one process: never known to be gone

    def _move(self, hold: Row, **moves: int) -> None:
        """Add ``moves`` to the team's counters, and to its key's if the hold has one."""
        team_key = (hold["team"], hold["period"])
        self.counters[team_key] = _added(self.counters.get(team_key, ZERO), moves)
        if hold["key_fp"] is not None:
            key = (hold["team"], hold["key_fp"], hold["period"])
            self.key_counters[key] = _added(self.key_counters.get(key, ZERO), moves)

    # -- the ledger view ---------------------------------------------------------------------

    def ledger(self, request_id: str) -> Row:
        """A row of the ``ledger`` view: the hold, its settlement, resolution and task."""
        h = self.holds[request_id]
        s = self.settlements.get(request_id) or {}
        r = self.resolutions.get(request_id) or {}
        c = self.corrections.get(request_id, ())
        settled_state = s.get("state", "held")
        if r:
            charged = r["amount"] + r["overrun"] if r["state"] == "captured" else 0
        else:
            charged = s["amount"] + s["overrun"] if settled_state == "captured" else 0
        corrected = [
            {"images": x["images"], "amount": x["amount"], "reason": x["reason"],
             "at": x["corrected_at"]}
            for x in c
        ]  # fmt: skip
        learned = [x["upstream_id"] for x in c if x["upstream_id"] is not None]
        served_by = [x["upstream"] for x in c if x["upstream"] is not None]
        task = self.tasks.get(self.task_of.get(request_id, ""))
        upstream_id = _first(s.get("upstream_id"), r.get("upstream_id"), max(learned, default=None))
        return {
            **h, "held": h["amount"], "state": r.get("state", settled_state),
            "settled_state": settled_state, "settled": s.get("amount", 0),
            "images": s.get("images", 0), "overrun": s.get("overrun", 0),
            "upstream_id": upstream_id,
            "task_id": self.task_of.get(request_id),
            "reason": s.get("reason"), "settled_at": s.get("settled_at"),
            "resolved_state": r.get("state"), "resolved_images": r.get("images"),
            "resolved_amount": r.get("amount"), "resolved_overrun": r.get("overrun"),
            "resolved_reason": r.get("reason"), "resolved_by": r.get("actor"),
            "resolved_at": r.get("resolved_at"),
            "charged": charged + sum(x["amount"] for x in c),
            "corrected_images": sum(x["images"] for x in c), "corrections": json.dumps(corrected),
            "upstream": _first(s.get("upstream"), r.get("upstream"),
                               max(served_by, default=None), (task or {}).get("upstream")),
            "upstream_unit_price": _first(s.get("unit_price"), (task or {}).get("unit_price")),
        }  # fmt: skip

    def _rows(self, keep: Callable[[Row], bool] = lambda row: True) -> list[Row]:
        return [row for row in map(self.ledger, self.holds) if keep(row)]

    def entry(self, *, request_id: str) -> list[Row]:
        return [self.ledger(request_id)] if request_id in self.holds else []

    def entry_by_any_id(self, *, entry_id: str) -> list[Row]:
        found = self._rows(lambda e: entry_id in (e["request_id"], e["upstream_id"], e["task_id"]))
        return sorted(found, key=lambda e: e["created_at"])[:1]

    def entries(
        self, *, team: str | None, state: str | None, since: float, until: float, limit: int | None
    ) -> list[Row]:
        found = self._rows(
            lambda e: (
                since <= e["created_at"] < until
                and team in (None, e["team"])
                and state in (None, e["state"])
            )
        )
        found.sort(key=lambda e: (e["created_at"], e["request_id"]), reverse=True)
        return found if limit is None else found[:limit]

    def unlogged_resolutions(self) -> list[Row]:
        found = [self.ledger(rid) for rid in self.resolutions if rid not in self.resolution_log]
        return sorted(found, key=lambda e: e["resolved_at"])

    def hold_state(self, *, request_id: str) -> list[Row]:
        if request_id not in self.holds:
            return []
        result = self.settlements.get(request_id, {}).get("result")
        return [{"state": self.ledger(request_id)["state"], "result": result}]

    def latest_attempt(
        self, *, team: str, fingerprint: str, since: float, lease_s: float, instance_id: str
    ) -> list[Row]:
        found = [
            h for h in self.holds.values()
            if h["team"] == team and h["fingerprint"] == fingerprint and h["created_at"] >= since
        ]  # fmt: skip
        if not found:
            return []
        rid = max(found, key=lambda h: h["created_at"])["request_id"]
        row = self.ledger(rid)
        result = self.settlements.get(rid, {}).get("result")
        return [{**row, "result": result, "live": 0}]

    def in_flight_holds(self) -> list[Row]:
        def in_flight(h: Row) -> bool:
            task = self.tasks.get(self.task_of.get(h["request_id"], ""))
            unpolled = task is None or (
                task["status"] == "pending" and task["next_poll_at"] >= NEVER
            )
            return h["request_id"] not in self.settlements and unpolled

        left = sorted(filter(in_flight, self.holds.values()), key=lambda h: h["created_at"])
        return [{"request_id": h["request_id"], "amount": h["amount"]} for h in left]

    def report(
        self, *, team: str, since: float, until: float, by: str | None, tz: str
    ) -> list[Row]:
        group: Callable[[Row], Any] = {
            "key": lambda e: e["key_fp"],
            "end_user": lambda e: e["end_user"],
            "quality": lambda e: e["quality"],
            "day": lambda e: local_day(e["created_at"], tz),
            "upstream": lambda e: e["upstream"],
        }.get(by or "", lambda e: None)
        groups: dict[Any, list[Row]] = {}
        for e in self._rows(lambda e: e["team"] == team and since <= e["created_at"] < until):
            groups.setdefault(group(e), []).append(e)
        if not groups:
            groups[None] = []
        rows = []
        for name in sorted(groups, key=lambda g: (g is not None, g or "")):
            found = groups[name]
            images = sum(
                (e["resolved_images"] if e["resolved_images"] is not None else e["images"])
                * (e["state"] == "captured")
                + e["corrected_images"]
                for e in found
            )
            last_at = max((e["created_at"] for e in found), default=None)
            key_id = self._last_key_id(name) if by == "key" else None
            rows.append({"grp": name, **_sums(found), "images": images,
                         "requests": len(found), "last_at": last_at, "key_id": key_id})  # fmt: skip
        return rows

    def _last_key_id(self, key_fp: str | None) -> str | None:
        holds = [h for h in self.holds.values() if h["key_fp"] == key_fp and key_fp is not None]
        return max(holds, key=lambda h: h["created_at"])["key_id"] if holds else None

    def daily_spend(self, *, team: str, since: float, until: float, tz: str) -> list[Row]:
        groups: dict[tuple[str, str | None, str], Row] = {}
        for e in self._rows(lambda e: e["team"] == team and since <= e["created_at"] < until):
            if e["settled_state"] == "held":
                continue
            group = (local_day(e["created_at"], tz), e["key_fp"], e["quality"])
            row = groups.setdefault(group, {"key_id": None, "spent": 0, "images": 0})
            row["key_id"] = max(filter(None, (row["key_id"], e["key_id"])), default=None)
            row["spent"] += e["charged"]
            captured = e["state"] == "captured"
            resolved = e["resolved_images"] if e["resolved_images"] is not None else e["images"]
            row["images"] += resolved * captured + e["corrected_images"]
        return [
            {"day": day, "key_fp": key_fp, "quality": quality, **row}
            for (day, key_fp, quality), row in sorted(
                groups.items(), key=lambda g: (g[0][0], g[0][1] or "", g[0][2])
            )
            if row["spent"] > 0
        ]

    def stored_results(self, *, request_ids: str) -> list[Row]:
        found = []
        for rid in json.loads(request_ids):
            if rid not in self.holds:
                continue
            e = self.ledger(rid)
            if e["state"] != "captured" and not e["corrected_images"]:
                continue
            task = self.tasks.get(self.task_of.get(rid, ""))
            result = self.settlements.get(rid, {}).get("result") or (task or {}).get("result")
            found.append({"request_id": rid, "result": result})
        return found

    def open_tasks(self, *, team: str, limit: int) -> list[Row]:
        pending = [t for t in self.tasks.values() if t["team"] == team and t["status"] == "pending"]
        pending.sort(key=lambda t: t["created_at"])
        return [self._task_row(t) for t in pending[:limit]]

    def key_last_used(self) -> list[Row]:
        last: dict[str, float] = {}
        for h in self.holds.values():
            if h["key_fp"] is not None:
                last[h["key_fp"]] = max(last.get(h["key_fp"], h["created_at"]), h["created_at"])
        return [{"key_fp": fp, "last_at": at} for fp, at in last.items()]

    def verify(self) -> list[Row]:
        entries = self._rows()
        rows = [
            {"kind": "stored", "scope": team, "period": period, **counters}
            for (team, period), counters in self.counters.items()
        ]
        rows += [
            {"kind": "key stored", "scope": f"{team} {fp}", "period": period, **counters}
            for (team, fp, period), counters in self.key_counters.items()
        ]
        teams = _grouped(entries, lambda e: (e["team"], e["team"], e["period"]))
        keys = _grouped(
            [e for e in entries if e["key_fp"] is not None],
            lambda e: (e["team"], f"{e['team']} {e['key_fp']}", e["period"]),
        )
        for kind, groups in (("summed", teams), ("key summed", keys)):
            rows += [
                {"kind": kind, "scope": scope, "period": period, **_sums(found)}
                for (_, scope, period), found in groups.items()
            ]
        rows.append({"kind": "count", "scope": "", "period": "", **ZERO, "spent": len(entries)})
        return rows

    # -- meta --------------------------------------------------------------------------------

    def schema_meta(self) -> list[Row]:
        names = ("schema_version", "schema_step", "min_release")
        return [{"key": k, "value": v} for k, v in self.meta.items() if k in names]

    def position(self) -> list[Row]:
        last_at = max((h["created_at"] for h in self.holds.values()), default=None)
        spent = sum(counters["spent"] for counters in self.counters.values())
        counts = {
            name: len(getattr(self, name)) for name in ("holds", "settlements", "resolutions")
        }
        return [{**counts, "last_at": last_at, "spent": spent}]

    def set_meta(self, *, key: str, value: str) -> int:
        self.meta[key] = value
        return 1

    def restores(self, *, prefix: str) -> list[Row]:
        start = prefix.removesuffix("%")
        return [{"key": k, "value": v} for k, v in sorted(self.meta.items()) if k.startswith(start)]

    # -- async tasks -------------------------------------------------------------------------

    def insert_task(self, *, task_id: str, request_id: str, **task: Any) -> int:
        if request_id not in self.holds:
            raise Refused("FOREIGN KEY constraint failed")
        if task_id in self.tasks:
            return 0
        if request_id in self.task_of:
            raise Refused("UNIQUE constraint failed: tasks.request_id")
        self.tasks[task_id] = {**task, "task_id": task_id, "request_id": request_id, "polls": 0}
        self.task_of[request_id] = task_id
        return 1

    def task(self, *, task_id: str) -> list[Row]:
        return [self._task_row(self.tasks[task_id])] if task_id in self.tasks else []

    def _task_row(self, task: Row) -> Row:
        rid = task["request_id"]
        hold, settled = self.holds[rid], self.settlements.get(rid)
        return {
            **task, "upstream_unit_price": task["unit_price"],
            "amount": hold["amount"], "unit_price": hold["unit_price"],
            "quality": hold["quality"], "n": hold["n"],
            "settled": settled["state"] if settled else None,
            "resolved": rid in self.resolutions,
        }  # fmt: skip

    def due_tasks(self, *, now: float, limit: int, lease_until: float) -> list[Row]:
        due = [t for t in self.tasks.values() if _pending(t) and t["next_poll_at"] <= now]
        due.sort(key=lambda t: t["next_poll_at"])
        return [self._task_row(t) for t in due[:limit]]

    def next_task_due(self) -> list[Row]:
        due = [t["next_poll_at"] for t in self.tasks.values() if _pending(t)]
        return [{"due": min(due, default=None)}]

    def unsettled_task_count(self) -> list[Row]:
        unsettled = [t for t in self.tasks.values() if t["request_id"] not in self.settlements]
        return [{"tasks": len(unsettled)}]

    def reschedule_task(self, *, task_id: str, next_poll_at: float) -> int:
        return self._update_task(task_id, lambda t: True, next_poll_at=next_poll_at)

    def finish_task(self, *, task_id: str, status: str, result: str) -> int:
        return self._update_task(task_id, _pending, status=status, result=result)

    def _update_task(self, task_id: str, where: Callable[[Row], bool], **values: Any) -> int:
        task = self.tasks.get(task_id)
        if task is None or not where(task):
            return 0
        self.tasks[task_id] = {**task, **values, "polls": task["polls"] + 1}
        return 1

    # -- idempotency -------------------------------------------------------------------------

    def expire_idempotency_key(self, *, team: str, key: str, before: float) -> int:
        return self._forget([(team, key)], lambda row: row["created_at"] < before)

    def claim_idempotency_key(self, *, team: str, key: str, instance_id: str, **row: Any) -> int:
        if (team, key) in self.idempotency:
            return 0
        claim = {**row, "status": None, "body": None, "headers": None}
        self.idempotency[(team, key)] = claim
        return 1

    def idempotency_key(
        self, *, team: str, key: str, instance_id: str, lease_s: float
    ) -> list[Row]:
        row = self.idempotency.get((team, key))
        return [] if row is None else [{**row, "live": 0}]

    def store_idempotent_outcome(self, *, team: str, key: str, **outcome: Any) -> int:
        if (team, key) not in self.idempotency:
            return 0
        self.idempotency[(team, key)] = {**self.idempotency[(team, key)], **outcome}
        return 1

    def release_idempotency_key(self, *, team: str, key: str) -> int:
        return self._forget([(team, key)], lambda row: row["status"] is None)

    def purge_idempotency(self, *, before: float) -> int:
        return self._forget(list(self.idempotency), lambda row: row["created_at"] < before)

    def _forget(self, keys: Iterable[tuple[str, str]], where: Callable[[Row], bool]) -> int:
        gone = [k for k in keys if k in self.idempotency and where(self.idempotency[k])]
        for k in gone:
            del self.idempotency[k]
        return len(gone)

    # -- the result store's index --------------------------------------------------------------

    def result_add(self, *, request_id: str, position: int, **image: Any) -> int:
        if (request_id, position) in self.result_index:
            return 0
        self.result_index[request_id, position] = {
            "request_id": request_id, "position": position, **image,
        }  # fmt: skip
        return 1

    def result_stored(self, *, request_id: str, position: int, **stored: Any) -> int:
        row = self.result_index.get((request_id, position))
        if row is None or row["deleted_at"] is not None:
            return 0
        self.result_index[request_id, position] = {**row, **stored}
        return 1

    def _result_rows(self, keep: Callable[[Row], bool]) -> list[Row]:
        return [row for row in self.result_index.values() if keep(row)]

    def result_of_request(self, *, request_id: str) -> list[Row]:
        found = self._result_rows(lambda r: r["request_id"] == request_id)
        return sorted(found, key=lambda r: r["position"])

    def result_by_url(self, *, url_sha256: str) -> list[Row]:
        found = self._result_rows(lambda r: r["url_sha256"] == url_sha256)
        return sorted(found, key=lambda r: r["created_at"], reverse=True)[:1]

    def result_reusable(self, *, team: str, reuse_key: str, since: float) -> list[Row]:
        groups: dict[str, list[Row]] = {}
        for row in self._result_rows(
            lambda r: (r["team"], r["reuse_key"]) == (team, reuse_key) and r["created_at"] >= since
        ):
            groups.setdefault(row["request_id"], []).append(row)
        whole = [
            rows
            for rows in groups.values()
            if len(rows) == rows[0]["images"]
            and all(r["digest"] is not None and r["deleted_at"] is None for r in rows)
        ]
        newest = sorted(whole, key=lambda rows: rows[0]["created_at"], reverse=True)
        return [{"request_id": rows[0]["request_id"]} for rows in newest[:1]]

    def result_choose(self, *, request_id: str | None, team: str | None, before: float | None
                      ) -> list[Row]:  # fmt: skip
        return self._result_rows(
            lambda r: (
                r["deleted_at"] is None
                and request_id in (None, r["request_id"])
                and team in (None, r["team"])
                and (before is None or r["created_at"] < before)
            )
        )

    def result_delete(self, *, request_id: str, position: int, deleted_at: float) -> int:
        row = self.result_index.get((request_id, position))
        if row is None or row["deleted_at"] is not None:
            return 0
        self.result_index[request_id, position] = {**row, "deleted_at": deleted_at}
        return 1

    def result_live_digests(self, *, digests: str) -> list[Row]:
        wanted = set(json.loads(digests))
        live = self._result_rows(lambda r: r["deleted_at"] is None and r["digest"] in wanted)
        return [{"digest": d} for d in sorted({r["digest"] for r in live})]

    def result_deleted_since(self, *, since: float) -> list[Row]:
        gone = self._result_rows(
            lambda r: r["digest"] is not None and r["deleted_at"] is not None
            and r["deleted_at"] >= since
        )  # fmt: skip
        return [{"digest": d} for d in sorted({r["digest"] for r in gone})]

    def _result_stored_live(self) -> list[Row]:
        return self._result_rows(lambda r: r["deleted_at"] is None and r["digest"] is not None)

    def result_totals(self) -> list[Row]:
        stored = self._result_stored_live()
        sizes = {r["digest"]: r["bytes"] or 0 for r in stored}
        return [{"images": len(stored), "bytes": sum(sizes.values())}]

    def result_unstored(self, *, since: float, limit: int) -> list[Row]:
        found = self._result_rows(
            lambda r: r["deleted_at"] is None and r["digest"] is None and r["created_at"] >= since
        )
        return sorted(found, key=lambda r: (r["created_at"], r["request_id"], r["position"]))[
            :limit
        ]

    def result_oldest(self, *, limit: int) -> list[Row]:
        order = sorted(
            self._result_stored_live(),
            key=lambda r: (r["created_at"], r["request_id"], r["position"]),
        )
        return order[:limit]


def _migrated() -> dict[str, str]:
    """The schema records of a database every migration has run on."""
    steps, state, records = migrations.load("sqlite"), migrations.SchemaState(0, 0), {}
    for step in steps:
        records = migrations.records_after(step, steps, state)
        state = migrations.state_of(records)
    return records


def _first(*values: Any) -> Any:
    """SQL's COALESCE: the first value that is not None."""
    return next((value for value in values if value is not None), None)


def _pending(task: Row) -> bool:
    return bool(task["status"] == "pending")


def _committed(counters: Row) -> int:
    return int(counters["spent"] + counters["reserved"] + counters["uncertain"])


def _added(counters: Row, moves: dict[str, int]) -> Row:
    return {name: counters[name] + moves.get(name, 0) for name in COUNTERS}


def _sums(entries: list[Row]) -> Row:
    """What the counters of a group of ledger rows must be (as the SQL ``verify`` sums)."""
    return {
        "spent": sum(e["charged"] for e in entries),
        "reserved": sum(e["held"] for e in entries if e["settled_state"] == "held"),
        "uncertain": sum(
            e["settled"]
            for e in entries
            if e["settled_state"] == "uncertain" and e["resolved_state"] is None
        ),
        "overrun": sum(e["overrun"] + (e["resolved_overrun"] or 0) for e in entries),
    }


def _grouped(
    entries: list[Row], key: Callable[[Row], tuple[str, str, str]]
) -> dict[tuple[str, str, str], list[Row]]:
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for e in entries:
        groups.setdefault(key(e), []).append(e)
    return groups

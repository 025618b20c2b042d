"""A restored ledger, refused at start until accepted; the watermark kept while serving.

See ``core.restore`` for what a watermark is. At start the ledger's position is compared with
the watermark before anything is written: behind it, the start is refused with one line saying
from when to when spend is missing, unless the operator accepts the loss
(``serve --accept-restored-ledger``), which is recorded in the ledger and logged. In a fleet, a
restore accepted on one instance after another's watermark was written covers that one too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from gateway.core.restore import Position, Watermark, gap
from gateway.ops import watermark as watermark_file
from gateway.store.manager import Store

log = logging.getLogger("gateway")

KEEP_EVERY_S = 10.0


class RestoredLedger(Exception):
    """The ledger is behind this gateway's watermark; the message is the one line to print."""


async def check_restored(db: Store, path: Path, *, accept: bool, where: str) -> None:
    """Refuse (RestoredLedger) a ledger behind the watermark at ``path``, or record its
    acceptance; then write the watermark afresh."""
    try:
        seen = watermark_file.read(path)
    except watermark_file.WatermarkUnreadable as exc:
        raise RestoredLedger(str(exc)) from None
    position = await db.position()
    missing = gap(position, seen)
    if missing is not None and seen is not None:
        covered = await db.restores_since(seen.written_at)
        if covered:
            by = json.loads(covered[-1]).get("by", "another instance")
            log.warning(
                "this gateway's watermark %s is ahead of the ledger, but a restore was accepted "
                "after it was written (by %s): going on from the restored ledger",
                path,
                by,
            )
        elif not accept:
            raise RestoredLedger(missing.describe(where))
        else:
            now = time.time()
            await db.record_restore(
                now, missing.record(now, f"{socket.gethostname()}:{os.getpid()}")
            )
            log.warning(
                "restored ledger accepted (recorded in the ledger): %s", missing.describe(where)
            )
        _write(path, Watermark(position, time.time()), merge=False)
        return
    if accept:
        log.info("--accept-restored-ledger: the ledger is not behind %s; nothing to accept", path)
    _write(path, Watermark(position, time.time()), merge=True)


class WatermarkKeeper:
    """Writes the ledger's position to the watermark when it moved (every ``KEEP_EVERY_S`` and
    at shutdown)."""

    def __init__(self, db: Store, path: Path) -> None:
        self._db = db
        self._path = path
        self._last: Position | None = None
        self._failing = False

    async def keep(self) -> None:
        position = await self._db.position()
        if position == self._last:
            return
        if _write(self._path, Watermark(position, time.time()), merge=True, quiet=self._failing):
            self._last, self._failing = position, False
        else:
            self._failing = True


def _write(path: Path, watermark: Watermark, *, merge: bool, quiet: bool = False) -> bool:
    try:
        watermark_file.write(path, watermark, merge=merge)
    except OSError as exc:
        if not quiet:
            log.warning(
                "cannot write the watermark %s (%s): a restore of an older ledger would not be "
                "detected until it can",
                path,
                exc.strerror or exc,
            )
        return False
    return True

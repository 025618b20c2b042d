"""The result store's index: one row per image of a paid result, in the ledger's database.

What the result service needs and nothing more: record a request's images when it is answered,
note each one once its bytes are stored, find them again (by request, by URL, by an identical
earlier request of the team), delete them (by request, team, age) and count them. Rows are
never removed: a deleted image keeps its row with ``deleted_at`` set, so its gateway URL
answers 410 and a fetch that finishes after the deletion cannot store it again.

The statements are written once, with ``?`` placeholders, for both engines (each engine only
runs them: ``SqlResultIndex``); ``MemoryResultIndex`` answers the same in Python for tests.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class ResultImage:
    """One image of a paid result. ``digest`` (hex SHA-256), ``bytes`` and ``kind`` are None
    until its bytes are stored; ``deleted_at`` is set once it is deleted or expired."""

    request_id: str
    position: int
    team: str
    upstream: str | None
    url: str
    url_sha256: str
    reuse_key: str | None
    images: int  # how many images the request has
    created_at: float
    digest: str | None = None
    bytes: int | None = None
    kind: str | None = None
    stored_at: float | None = None
    deleted_at: float | None = None

    @property
    def live(self) -> bool:
        return self.deleted_at is None


@dataclass(frozen=True, slots=True)
class Blob:
    """Stored bytes: their hex SHA-256 (the file's name), size and type (by magic bytes)."""

    digest: str
    size: int
    kind: str


@dataclass(frozen=True, slots=True)
class Totals:
    images: int  # live stored images (rows)
    bytes: int  # their files on disk: each digest once


@dataclass(frozen=True, slots=True)
class Deletion:
    """Which images to delete: all three given narrow it (None: any)."""

    request_id: str | None = None
    team: str | None = None
    before: float | None = None  # created before this


class ResultIndex(abc.ABC):
    @abc.abstractmethod
    async def add(self, images: Sequence[ResultImage]) -> None:
        """Record a request's images (not yet stored); rows already there are left as they are."""

    @abc.abstractmethod
    async def stored(self, request_id: str, position: int, blob: Blob, now: float) -> bool:
        """Note that the image's bytes are stored; False if it was deleted meanwhile."""

    @abc.abstractmethod
    async def of_request(self, request_id: str) -> list[ResultImage]:
        """The request's images in order, deleted ones included."""

    @abc.abstractmethod
    async def by_url(self, url_sha256: str) -> ResultImage | None:
        """The newest image with that URL (deleted included: it answers 410)."""

    @abc.abstractmethod
    async def reusable(self, team: str, reuse_key: str, since: float) -> str | None:
        """The newest request of the team made since ``since`` with that key whose every image
        is stored and none deleted."""

    @abc.abstractmethod
    async def delete(self, which: Deletion, now: float) -> list[ResultImage]:
        """Mark the live images chosen as deleted; the rows as they were before."""

    @abc.abstractmethod
    async def live_digests(self, digests: Sequence[str]) -> set[str]:
        """Those of ``digests`` a live image still refers to (its file must stay)."""

    @abc.abstractmethod
    async def deleted_since(self, since: float) -> list[str]:
        """The digests of images deleted at ``since`` or later (another instance of a fleet
        may have deleted them: this one removes its own copies)."""

    @abc.abstractmethod
    async def totals(self) -> Totals: ...

    @abc.abstractmethod
    async def oldest(self, limit: int) -> list[ResultImage]:
        """Live stored images, oldest first (what goes first beyond ``max_gb``)."""


COLUMNS = (
    "request_id, position, team, upstream, url, url_sha256, reuse_key, images, created_at,"
    " digest, bytes, kind, stored_at, deleted_at"
)
SQL = {
    "add": f"INSERT INTO result_images ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (request_id, position) DO NOTHING",
    "stored": "UPDATE result_images SET digest = ?, bytes = ?, kind = ?, stored_at = ?"
    " WHERE request_id = ? AND position = ? AND deleted_at IS NULL",
    "of_request": f"SELECT {COLUMNS} FROM result_images WHERE request_id = ? ORDER BY position",
    "by_url": f"SELECT {COLUMNS} FROM result_images WHERE url_sha256 = ?"
    " ORDER BY created_at DESC LIMIT 1",
    "reusable": "SELECT request_id FROM result_images WHERE team = ? AND reuse_key = ?"
    " AND created_at >= ? GROUP BY request_id, images, created_at"
    " HAVING COUNT(*) = images AND COUNT(digest) = images AND COUNT(deleted_at) = 0"
    " ORDER BY created_at DESC LIMIT 1",
    "choose": f"SELECT {COLUMNS} FROM result_images WHERE deleted_at IS NULL"
    " AND (CAST(? AS TEXT) IS NULL OR request_id = ?) AND (CAST(? AS TEXT) IS NULL OR team = ?)"
    " AND (CAST(? AS DOUBLE PRECISION) IS NULL OR created_at < ?)",
    "delete": "UPDATE result_images SET deleted_at = ? WHERE deleted_at IS NULL"
    " AND request_id = ? AND position = ?",
    "live_digests": "SELECT DISTINCT digest FROM result_images WHERE deleted_at IS NULL"
    " AND digest IN ({marks})",
    "deleted_since": "SELECT DISTINCT digest FROM result_images WHERE deleted_at >= ?"
    " AND digest IS NOT NULL ORDER BY digest",
    "totals": "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM result_images"
    " WHERE deleted_at IS NULL AND digest IS NOT NULL",
    "distinct_bytes": "SELECT COALESCE(SUM(size), 0) FROM (SELECT MAX(bytes) AS size"
    " FROM result_images WHERE deleted_at IS NULL AND digest IS NOT NULL GROUP BY digest) d",
    "oldest": f"SELECT {COLUMNS} FROM result_images WHERE deleted_at IS NULL"
    " AND digest IS NOT NULL ORDER BY created_at, request_id, position LIMIT ?",
}

DIGESTS_AT_ONCE = 500  # bound parameters per statement (SQLite allows 32,766, PostgreSQL 65,535)
Execute = Callable[[str, Sequence[Any]], Awaitable[int]]  # rows changed
Fetch = Callable[[str, Sequence[Any]], Awaitable[Sequence[Sequence[Any]]]]


class SqlResultIndex(ResultIndex):
    """The index on either engine: ``execute`` and ``fetch`` run one ``?``-placeholder
    statement on it (each engine's store supplies them, and its own error handling)."""

    def __init__(self, execute: Execute, fetch: Fetch) -> None:
        self._execute = execute
        self._fetch = fetch

    async def add(self, images: Sequence[ResultImage]) -> None:
        for image in images:  # a handful per request; each insert is its own commit
            await self._execute(SQL["add"], _values(image))

    async def stored(self, request_id: str, position: int, blob: Blob, now: float) -> bool:
        params = (blob.digest, blob.size, blob.kind, float(now), request_id, position)
        return await self._execute(SQL["stored"], params) > 0

    async def of_request(self, request_id: str) -> list[ResultImage]:
        return [_image(row) for row in await self._fetch(SQL["of_request"], (request_id,))]

    async def by_url(self, url_sha256: str) -> ResultImage | None:
        rows = await self._fetch(SQL["by_url"], (url_sha256,))
        return _image(rows[0]) if rows else None

    async def reusable(self, team: str, reuse_key: str, since: float) -> str | None:
        rows = await self._fetch(SQL["reusable"], (team, reuse_key, float(since)))
        return str(rows[0][0]) if rows else None

    async def delete(self, which: Deletion, now: float) -> list[ResultImage]:
        params = (which.request_id, which.request_id, which.team, which.team)
        before = None if which.before is None else float(which.before)
        chosen = await self._fetch(SQL["choose"], (*params, before, before))
        deleted = []
        for image in map(_image, chosen):
            if await self._execute(SQL["delete"], (float(now), image.request_id, image.position)):
                deleted.append(image)
        return deleted

    async def live_digests(self, digests: Sequence[str]) -> set[str]:
        wanted, live = sorted(set(digests)), set[str]()
        for start in range(0, len(wanted), DIGESTS_AT_ONCE):
            chunk = wanted[start : start + DIGESTS_AT_ONCE]
            sql = SQL["live_digests"].format(marks=",".join("?" * len(chunk)))
            live.update(str(row[0]) for row in await self._fetch(sql, chunk))
        return live

    async def deleted_since(self, since: float) -> list[str]:
        return [str(row[0]) for row in await self._fetch(SQL["deleted_since"], (float(since),))]

    async def totals(self) -> Totals:
        (count, _), *_ = await self._fetch(SQL["totals"], ())
        ((size,),) = await self._fetch(SQL["distinct_bytes"], ())
        return Totals(int(count), int(size))

    async def oldest(self, limit: int) -> list[ResultImage]:
        return [_image(row) for row in await self._fetch(SQL["oldest"], (limit,))]


class MemoryResultIndex(ResultIndex):
    """The same answers from a dict, for the service's tests."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], ResultImage] = {}

    async def add(self, images: Sequence[ResultImage]) -> None:
        for image in images:
            self.rows.setdefault((image.request_id, image.position), image)

    async def stored(self, request_id: str, position: int, blob: Blob, now: float) -> bool:
        row = self.rows.get((request_id, position))
        if row is None or not row.live:
            return False
        self.rows[request_id, position] = replace(
            row, digest=blob.digest, bytes=blob.size, kind=blob.kind, stored_at=now
        )
        return True

    async def of_request(self, request_id: str) -> list[ResultImage]:
        return sorted(
            (r for r in self.rows.values() if r.request_id == request_id),
            key=lambda r: r.position,
        )

    async def by_url(self, url_sha256: str) -> ResultImage | None:
        found = [r for r in self.rows.values() if r.url_sha256 == url_sha256]
        return max(found, key=lambda r: r.created_at) if found else None

    async def reusable(self, team: str, reuse_key: str, since: float) -> str | None:
        groups: dict[str, list[ResultImage]] = {}
        for row in self.rows.values():
            if row.team == team and row.reuse_key == reuse_key and row.created_at >= since:
                groups.setdefault(row.request_id, []).append(row)
        whole = [
            rows
            for rows in groups.values()
            if len(rows) == rows[0].images and all(r.live and r.digest for r in rows)
        ]
        return max(whole, key=lambda rows: rows[0].created_at)[0].request_id if whole else None

    async def delete(self, which: Deletion, now: float) -> list[ResultImage]:
        chosen = [
            row
            for row in self.rows.values()
            if row.live
            and which.request_id in (None, row.request_id)
            and which.team in (None, row.team)
            and (which.before is None or row.created_at < which.before)
        ]
        for row in chosen:
            self.rows[row.request_id, row.position] = replace(row, deleted_at=now)
        return chosen

    async def live_digests(self, digests: Sequence[str]) -> set[str]:
        return {r.digest for r in self.rows.values() if r.live and r.digest in digests}  # type: ignore[misc]

    async def deleted_since(self, since: float) -> list[str]:
        return sorted({
            r.digest for r in self.rows.values()
            if r.digest and r.deleted_at is not None and r.deleted_at >= since
        })  # fmt: skip

    async def totals(self) -> Totals:
        stored = [r for r in self.rows.values() if r.live and r.digest]
        sizes = {r.digest: r.bytes or 0 for r in stored}
        return Totals(len(stored), sum(sizes.values()))

    async def oldest(self, limit: int) -> list[ResultImage]:
        stored = [r for r in self.rows.values() if r.live and r.digest]
        return sorted(stored, key=lambda r: (r.created_at, r.request_id, r.position))[:limit]


def _values(image: ResultImage) -> tuple[Any, ...]:
    return (
        image.request_id, image.position, image.team, image.upstream, image.url,
        image.url_sha256, image.reuse_key, image.images, image.created_at, image.digest,
        image.bytes, image.kind, image.stored_at, image.deleted_at,
    )  # fmt: skip


def _image(row: Sequence[Any]) -> ResultImage:
    return ResultImage(*row)

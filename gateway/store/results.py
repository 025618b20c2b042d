"""The result store's index: one row per image of a paid result, in the ledger's database.

What the result service needs and nothing more: record a request's images when it is answered,
note each one once its bytes are stored, find them again (by request, by URL, by an identical
earlier request of the team), delete them (by request, team, age) and count them. Rows are
never removed: a deleted image keeps its row with ``deleted_at`` set, so its gateway URL
answers 410 and a fetch that finishes after the deletion cannot store it again.

Each operation is written once, as a script of named statements (``engine.Script``) that every
engine runs: its ``result_*`` statements in ``sql/<engine>/queries.sql``, the in-memory engine's
in Python.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, field, fields
from typing import Any

from gateway.store.engine import Engine, Script, count, every, one, only


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
    written: bool = field(default=False, compare=False)  # a new file (else it was there)


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


class ResultIndex:
    """The index in the ledger's database, over the store's engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def add(self, images: Sequence[ResultImage]) -> None:
        """Record a request's images (not yet stored), in one commit; rows already there are
        left as they are."""

        def add() -> Script[None]:
            for image in images:
                yield count("result_add", **_params(image))

        await self._engine.write(add(), atomic=True)

    async def stored(self, request_id: str, position: int, blob: Blob, now: float) -> bool:
        """Note that the image's bytes are stored; False if it was deleted meanwhile."""
        step = count(
            "result_stored",
            request_id=request_id,
            position=position,
            digest=blob.digest,
            bytes=blob.size,
            kind=blob.kind,
            stored_at=float(now),
        )
        return bool(await self._engine.write(only(step)))

    async def of_request(self, request_id: str) -> list[ResultImage]:
        """The request's images in order, deleted ones included."""
        rows = await self._engine.read(only(every("result_of_request", request_id=request_id)))
        return [_image(row) for row in rows]

    async def by_url(self, url_sha256: str) -> ResultImage | None:
        """The newest image with that URL (deleted included: it answers 410)."""
        row = await self._engine.read(only(one("result_by_url", url_sha256=url_sha256)))
        return None if row is None else _image(row)

    async def reusable(self, team: str, reuse_key: str, since: float) -> str | None:
        """The newest request of the team made since ``since`` with that key whose every image
        is stored and none deleted."""
        step = one("result_reusable", team=team, reuse_key=reuse_key, since=float(since))
        row = await self._engine.read(only(step))
        return None if row is None else str(row["request_id"])

    async def delete(self, which: Deletion, now: float) -> list[ResultImage]:
        """Mark the live images chosen as deleted, at once; the rows as they were before."""
        before = None if which.before is None else float(which.before)

        def delete() -> Script[list[ResultImage]]:
            chosen = yield every(
                "result_choose", request_id=which.request_id, team=which.team, before=before
            )
            deleted = []
            for image in map(_image, chosen):
                mark = count(
                    "result_delete",
                    request_id=image.request_id,
                    position=image.position,
                    deleted_at=float(now),
                )
                if (yield mark):
                    deleted.append(image)
            return deleted

        return await self._engine.write(delete(), atomic=True)

    async def live_digests(self, digests: Sequence[str]) -> set[str]:
        """Those of ``digests`` a live image still refers to (its file must stay)."""
        if not digests:
            return set()
        step = every("result_live_digests", digests=json.dumps(sorted(set(digests))))
        return {str(row["digest"]) for row in await self._engine.read(only(step))}

    async def deleted_since(self, since: float) -> list[str]:
        """The digests of images deleted at ``since`` or later (another instance of a fleet
        may have deleted them: this one removes its own copies)."""
        step = every("result_deleted_since", since=float(since))
        return [str(row["digest"]) for row in await self._engine.read(only(step))]

    async def totals(self) -> Totals:
        """Live stored images, and the bytes of their files (each digest once)."""
        row = await self._engine.read(only(one("result_totals")))
        assert row is not None  # an aggregate always has its row
        return Totals(int(row["images"]), int(row["bytes"]))

    async def unstored(self, since: float, limit: int) -> list[ResultImage]:
        """Live images indexed at ``since`` or later whose bytes were never stored, oldest
        first."""
        step = every("result_unstored", since=float(since), limit=limit)
        return [_image(row) for row in await self._engine.read(only(step))]

    async def oldest(self, limit: int) -> list[ResultImage]:
        """Live stored images, oldest first (what goes first beyond ``max_gb``)."""
        rows = await self._engine.read(only(every("result_oldest", limit=limit)))
        return [_image(row) for row in rows]


FIELDS = tuple(f.name for f in fields(ResultImage))


def _params(image: ResultImage) -> dict[str, Any]:
    return dict(zip(FIELDS, astuple(image), strict=True))


def _image(row: Mapping[str, Any]) -> ResultImage:
    return ResultImage(*(row[name] for name in FIELDS))

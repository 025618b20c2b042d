"""Keep what was paid for: each image of a paid result, fetched once and stored on disk.

A paid result is handed over (``paid``) as soon as it is known; its images are indexed and
fetched in the background (bounded concurrency, retries with backoff, only from the serving
upstream's own hosts: the ``Downloader`` refuses any other), never on the request's critical
path. Whoever needs the bytes (a ``b64_json`` answer, a replay, ``proxy_results``, the console)
reads the store, or fetches them itself and keeps them: a download already under way for the
same image is joined, never repeated.

The store can never fail a paid request: a full or read-only disk, a broken index or an
unreachable file host leaves the image at the upstream (its URL still answers), with a WARNING
and ``gateway_results_fetch_failures_total``. Retention (``keep_days``, ``max_gb``) and deletion
mark the index rows deleted and remove the files no live row names; the ledger is never
touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.core.config import Settings
from gateway.core.errors import StorageUnavailable
from gateway.core.results import url_key
from gateway.ops.metrics import Metrics
from gateway.store.blobs import Blobs, NotAnImage
from gateway.store.results import Deletion, ResultImage, ResultIndex, Totals
from gateway.upstream.base import DownloadError
from gateway.upstream.downloader import Downloader

log = logging.getLogger("gateway.results")

FETCH_CONCURRENCY = 4  # background downloads at once (a b64_json answer does not queue)
FETCH_ATTEMPTS = 3
BACKOFF_S = (1.0, 4.0)  # before the second and third attempt
EVICT_BATCH = 100
RESUME_AT_MOST = 1000  # images fetched again at start (the newest day's, oldest first)
SWEEP_OVERLAP_S = 3600.0  # deletions are looked at again for this long (clocks of a fleet differ)
DAY_S = 86400.0
WARN_EVERY_S = 60.0  # a full disk fails every image: one warning a minute says so


class Expired(Exception):
    """The image was deleted (by its team, a purge, or retention): its gateway URL is gone."""


@dataclass(frozen=True, slots=True)
class Paid:
    """A paid result whose images are to be kept."""

    request_id: str
    team: str
    upstream: str | None
    urls: tuple[str, ...]
    reuse_key: str | None  # set where the opt-in cache may answer it again
    created_at: float
    urgent: bool = False  # its answer waits for the bytes (b64_json): fetched at once, first


@dataclass(frozen=True, slots=True)
class Found:
    """A stored image to serve: its verified file, or (if it could not be kept) its bytes."""

    kind: str
    path: Path | None = None
    data: bytes | None = None


class Results:
    def __init__(
        self,
        *,
        index: ResultIndex,
        blobs: Blobs | None,
        downloader: Downloader,
        metrics: Metrics,
        clock: Callable[[], datetime],
        settings: Callable[[], Settings],
    ) -> None:
        self._index = index
        self._blobs = blobs
        self._downloader = downloader
        self._metrics = metrics
        self._clock = clock
        self._settings = settings
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._downloads: dict[str, asyncio.Future[bytes]] = {}
        self._wanted: dict[str, str] = {}  # url_key -> the request whose job keeps it
        self._slots = asyncio.Semaphore(FETCH_CONCURRENCY)
        self._warned: dict[str, float] = {}
        self._swept_at = 0.0  # deletions seen up to here (0: every one, at start)

    @property
    def enabled(self) -> bool:
        """``[results] store = "directory"``."""
        return self._blobs is not None

    @property
    def index(self) -> ResultIndex:
        return self._index

    # -- keeping -----------------------------------------------------------------------------

    def paid(self, paid: Paid) -> None:
        """Index the result's images and fetch them in the background."""
        if self._blobs is None or not paid.urls:
            return
        self._start(paid.request_id, [url_key(url) for url in paid.urls], self._keep(paid))

    def _start(self, request_id: str, keys: list[str], job: Coroutine[Any, Any, None]) -> None:
        """Run ``job``, keeping the request's images (one job per request at a time)."""
        if request_id in self._jobs:
            job.close()
            return
        self._wanted.update(dict.fromkeys(keys, request_id))
        task = asyncio.create_task(job, name=f"keeping {request_id}")
        self._jobs[request_id] = task

        def done(_: object) -> None:
            self._jobs.pop(request_id, None)
            for key in keys:
                if self._wanted.get(key) == request_id:
                    del self._wanted[key]
                    download = self._downloads.get(key)
                    if download is not None and download.done():
                        del self._downloads[key]

        task.add_done_callback(done)

    async def _resume(self) -> None:
        """Fetch again the images of the last day that were indexed and never stored: a
        process stopped (or killed) while keeping them. Once per start: an image whose URL no
        longer answers is not asked for every minute."""
        rows = await self._index.unstored(self._now() - DAY_S, RESUME_AT_MOST)
        by_request: dict[str, list[ResultImage]] = {}
        for row in rows:
            by_request.setdefault(row.request_id, []).append(row)
        for request_id, images in by_request.items():
            self._start(request_id, [r.url_sha256 for r in images], self._keep_again(images))

    async def _keep_again(self, rows: list[ResultImage]) -> None:
        await asyncio.gather(*(self._keep_one(row, urgent=False) for row in rows))

    async def kept(self, request_id: str) -> None:
        """Wait until the request's images are stored (or given up on)."""
        job = self._jobs.get(request_id)
        if job is not None:
            await asyncio.wait([job])

    async def idle(self) -> None:
        """Wait for every background job (tests, shutdown)."""
        while self._jobs:
            await asyncio.wait(list(self._jobs.values()))

    async def close(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel()
        await self.idle()

    async def _keep(self, paid: Paid) -> None:
        rows = [
            ResultImage(
                paid.request_id,
                position,
                paid.team,
                paid.upstream,
                url,
                url_key(url),
                paid.reuse_key,
                len(paid.urls),
                paid.created_at,
            )
            for position, url in enumerate(paid.urls)
        ]
        try:
            await self._index.add(rows)
        except StorageUnavailable as exc:
            self._failed("index", f"result images of {paid.request_id} not indexed: {exc}")
            return
        await asyncio.gather(*(self._keep_one(row, urgent=paid.urgent) for row in rows))

    async def _keep_one(self, row: ResultImage, *, urgent: bool) -> None:
        try:
            try:
                data = await self._download(row.url, background=not urgent)
            except DownloadError:
                if not urgent:
                    raise
                data = await self._download(row.url, background=True)  # the client has its URL
        except DownloadError as exc:
            self._failed("fetch", f"result image {row.position} of {row.request_id}: {exc}")
            return
        await self._put(row, data)

    async def _put(self, row: ResultImage, data: bytes) -> Found | None:
        """Store ``data`` as ``row``'s image; None if it could not be (warned and counted)."""
        assert self._blobs is not None
        try:
            blob = await asyncio.to_thread(self._blobs.put, data)
        except NotAnImage as exc:
            self._failed("not_image", f"result image {row.position} of {row.request_id}: {exc}")
            return None
        except OSError as exc:
            where = self._blobs.root
            self._failed("disk", f"the result store {where} cannot be written: {exc.strerror}")
            return None
        try:
            kept = await self._index.stored(row.request_id, row.position, blob, self._now())
        except StorageUnavailable as exc:
            self._failed("index", f"result image of {row.request_id} stored, not indexed: {exc}")
            return None
        if not kept:  # deleted while it was being fetched: it must not stay
            await self._forget([blob.digest])
            return None
        # The gauges move with what this instance stores; each retention pass and deletion
        # recounts them exactly (a count scans the whole index: 0.27 s at 100,000 images).
        if row.digest is None:  # not counted yet (a refetched copy is)
            self._metrics.results_images.inc()
            if blob.written:
                self._metrics.results_bytes.inc(blob.size)
        return Found(blob.kind, path=self._blobs.path(blob.digest))

    async def _download(self, url: str, *, background: bool) -> bytes:
        """The image at ``url``, joining a download of it under way, or (for an image a job is
        keeping) one done and not yet stored: fetched once, whoever asks first."""
        key = url_key(url)
        running = self._downloads.get(key)
        if running is not None and running.done() and not _succeeded(running):
            running = None  # a failed try is not the last word
        if running is None:
            running = asyncio.ensure_future(self._fetch(url, background=background))
            self._downloads[key] = running
            running.add_done_callback(lambda done: self._downloaded(key, done))
        return await asyncio.shield(running)

    def _downloaded(self, key: str, download: asyncio.Future[bytes]) -> None:
        """Forgotten once done, unless a job is keeping that image (then when the job ends)."""
        if key not in self._wanted and self._downloads.get(key) is download:
            del self._downloads[key]

    async def _fetch(self, url: str, *, background: bool) -> bytes:
        """Background fetches wait for a slot and retry with backoff; an answer's own fetch
        (``b64_json``) goes at once, once: its client is waiting."""
        if not background:
            return await self._downloader.fetch_image(url)
        async with self._slots:
            for attempt in range(FETCH_ATTEMPTS):
                try:
                    return await self._downloader.fetch_image(url)
                except DownloadError as exc:
                    if attempt + 1 == FETCH_ATTEMPTS or "refusing" in str(exc):
                        raise
                    await asyncio.sleep(BACKOFF_S[attempt])
        raise AssertionError("unreachable")  # pragma: no cover

    # -- reading -----------------------------------------------------------------------------

    async def image(self, url: str) -> bytes:
        """An image's bytes (``b64_json``): from the store, else fetched (and kept if it is a
        stored result's). Expired if deleted; DownloadError if it cannot be had.

        An image being kept right now (a fresh ``b64_json`` answer) shares its job's download."""
        if url_key(url) in self._wanted:
            return await self._download(url, background=False)
        row = await self._row(url)
        if self._blobs is not None and row is not None and row.digest is not None:
            data = await asyncio.to_thread(self._blobs.read, row.digest)
            if data is not None:
                return data
            log.warning("a stored result image of %s was corrupt or missing: fetching it again",
                        row.request_id)  # fmt: skip
        data = await self._download(row.url if row else url, background=False)
        if self._blobs is not None and row is not None and row.request_id not in self._jobs:
            await self._put(row, data)
        return data

    async def file(self, url: str, upstream: str | None = None) -> Found | None:
        """A stored result image to serve (``proxy_results``, the console), fetched and kept
        first if this instance lacks it; None for a URL the index does not know, or knows as
        another ``upstream``'s (stream it as before). Expired if deleted; DownloadError if it
        cannot be had."""
        row = await self._row(url, upstream)
        if row is None or self._blobs is None:
            return None
        if row.digest is not None and row.kind is not None:
            path = await asyncio.to_thread(self._blobs.verified, row.digest)
            if path is not None:
                return Found(row.kind, path=path)
        data = await self._download(row.url, background=False)
        found = await self._put(row, data)
        if found is None:
            return None  # not kept: stream it from the upstream as before
        return found

    async def _row(self, url: str, upstream: str | None = None) -> ResultImage | None:
        try:
            row = await self._index.by_url(url_key(url))
        except StorageUnavailable:
            return None  # the index is out of reach: the upstream still has the image
        if row is not None and None not in (upstream, row.upstream) and row.upstream != upstream:
            return None  # the same path at another upstream is not this image
        if row is not None and not row.live:
            raise Expired
        return row

    # -- deleting ----------------------------------------------------------------------------

    async def delete_request(self, request_id: str, team: str, urls: Sequence[str]) -> int | None:
        """Delete a request's images now (its owner asked): the number deleted, or None if
        they were all deleted already. Rows are written for images not indexed yet, so a
        fetch still under way cannot keep them."""
        now = self._now()
        rows = [
            ResultImage(request_id, i, team, None, url, url_key(url), None, len(urls), now)
            for i, url in enumerate(urls)
        ]
        await self._index.add(rows)
        deleted = await self.delete(Deletion(request_id=request_id))
        return len(deleted) or None

    async def delete(self, which: Deletion) -> list[ResultImage]:
        deleted = await delete_images(self._index, self._blobs, which, self._now())
        if deleted:
            await self.count()
        return deleted

    async def sweep(self) -> int:
        """The retention pass: this instance's copies of images deleted anywhere (by a team, a
        purge, another instance's pass), then each team's images older than its ``keep_days``
        (a team no longer configured: the longest ``keep_days`` of all), then the oldest beyond
        ``max_gb``. The number of images deleted."""
        settings = self._settings()
        config = settings.results
        now = self._now()
        if not self._swept_at and self._blobs is not None:  # the first pass, at start
            await self._resume()
        elsewhere = await self._index.deleted_since(self._swept_at)  # by other instances too
        await self._forget(elsewhere)
        self._swept_at = now - SWEEP_OVERLAP_S
        deleted = 0
        for team in settings.teams.values():
            before = now - config.keep_days_of(team) * DAY_S
            deleted += len(await self.delete(Deletion(team=team.name, before=before)))
        longest = max(
            [config.keep_days_of(t) for t in settings.teams.values()] + [config.keep_days]
        )
        deleted += len(await self.delete(Deletion(before=now - longest * DAY_S)))
        totals = await self.count()
        while totals.bytes > config.max_bytes:
            oldest = await self._index.oldest(EVICT_BATCH)
            if not oldest:
                break
            freed = 0
            for row in oldest:
                if freed and totals.bytes - freed <= config.max_bytes:
                    break
                gone = await self.delete(Deletion(request_id=row.request_id))
                freed += sum(r.bytes or 0 for r in gone)
                deleted += len(gone)
            totals = await self.count()
        return deleted

    async def count(self) -> Totals:
        """The store's totals, into the gauges."""
        totals = await self._index.totals()
        self._metrics.results_images.set(totals.images)
        self._metrics.results_bytes.set(totals.bytes)
        return totals

    async def _forget(self, digests: Sequence[str]) -> None:
        await forget_files(self._index, self._blobs, digests)

    # -- helpers -----------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock().timestamp()

    def _failed(self, reason: str, message: str) -> None:
        """Counted every time; warned once a minute per reason (a full disk fails them all)."""
        self._metrics.results_fetch_failures.labels(reason).inc()
        now = time.monotonic()
        if now - self._warned.get(reason, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[reason] = now
            log.warning("result store: %s; the upstream's URL still serves it", message)


async def delete_images(
    index: ResultIndex, blobs: Blobs | None, which: Deletion, now: float
) -> list[ResultImage]:
    """Mark the images chosen deleted, then remove the files no live image names."""
    deleted = await index.delete(which, now)
    await forget_files(index, blobs, [row.digest for row in deleted if row.digest is not None])
    return deleted


async def forget_files(index: ResultIndex, blobs: Blobs | None, digests: Sequence[str]) -> None:
    """Remove the files of ``digests`` that no live image names any more (identical bytes of
    another request keep theirs)."""
    if blobs is None or not digests:
        return
    keep = await index.live_digests(digests)
    failed = await asyncio.to_thread(blobs.remove_all, set(digests) - keep)
    if failed:
        log.warning(
            "result store: %d deleted image file(s) could not be removed from %s (%s); the "
            "retention pass tries again for an hour, then an operator must remove them",
            len(failed),
            blobs.root,
            failed[0].strerror or type(failed[0]).__name__,
        )


def _succeeded(download: asyncio.Future[bytes]) -> bool:
    return not download.cancelled() and download.exception() is None


def open_blobs(directory: Path | None) -> Blobs | None:
    """The results directory, made if need be; a directory that cannot be made is warned
    about and written to all the same (each write then fails, counted: never a request)."""
    if directory is None:
        return None
    blobs = Blobs(directory)
    with contextlib.suppress(OSError):
        blobs.prepare()
        return blobs
    log.warning("result store: cannot create %s; images stay at the upstream", directory)
    return blobs

"""Route handlers: authenticate, read, normalize, then hand over to the services.

Handlers hold no business rules of their own; they orchestrate and fill the access-log record.
Money reaches the record through its ``LogSlot`` when it is committed, not from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

import aiohttp
from aiohttp import web

from gateway.core.auth import check_expiry
from gateway.core.config import KeyConfig, Settings, TeamConfig
from gateway.core.errors import (
    Gone,
    NotFound,
    StorageUnavailable,
    Unauthorized,
)
from gateway.core.limits import Scope, scopes
from gateway.core.live import Snapshot
from gateway.core.normalize import (
    UPSTREAM_MODEL,
    Endpoint,
    ImageRequest,
    end_user_label,
    normalize,
    sdk_client,
)
from gateway.core.periods import period_at
from gateway.core.results import result_urls
from gateway.core.wire import fingerprint, reuse_key
from gateway.http.admission import body_cost
from gateway.http.answers import respond, respond_task
from gateway.http.body import BodyLimits, read_body
from gateway.http.keys import (
    BODIES,
    CLOCK,
    CONFIG,
    DB,
    DOWNLOADER,
    DURABLE,
    GENERATIONS,
    IDEMPOTENCY,
    LEDGER_ID,
    RECORD,
    RESULTS,
    REUSE,
    ROUTING,
    SETTLING,
    SLOT,
    TASKS,
)
from gateway.http.responses import json_response
from gateway.http.results import file_query, is_result_path
from gateway.ops.accesslog import FILES_PATH, result_id, short_id
from gateway.services.generation import Job
from gateway.services.idempotency import HEADER as IDEMPOTENCY_HEADER
from gateway.services.idempotency import check_key
from gateway.services.outcomes import Outcome, Replay
from gateway.services.results import Expired, Found
from gateway.services.reuse import HEADER as CACHE_HEADER
from gateway.services.reuse import choose
from gateway.services.usage import standing
from gateway.upstream.base import DownloadError

log = logging.getLogger("gateway")

MAX_ID_CHARS = 200

ASYNC_VALUES = ("1", "true", "yes")
RETRY_HEADER = "x-stainless-retry-count"
END_USER_HEADER = "X-Gateway-End-User"
FILE_CHUNK = 64 * 1024


async def create_image(request: web.Request) -> web.Response:
    """POST /v1/images/generations and /v1/images/edits (and the same without /v1)."""
    app = request.app
    record = request[RECORD]
    endpoint: Endpoint = "edits" if request.path.endswith("/edits") else "generations"
    async_value = request.query.get("async")
    mode: Literal["sync", "async"] = (
        "async" if async_value is not None and async_value.lower() in ASYNC_VALUES else "sync"
    )
    record.update(endpoint=endpoint, mode=mode)
    snapshot = app[CONFIG].current
    team, key = _caller(request, snapshot)
    retry_count = _retry_count(request, record)
    idempotency_key = check_key(request.headers.get(IDEMPOTENCY_HEADER))
    settings = snapshot.settings
    async with _admitted(request, team, key):
        limits = BodyLimits(settings.server.max_body_bytes, settings.server.max_image_bytes)
        cost = body_cost(request.content_length, limits.max_body_bytes)
        async with app[BODIES].hold(cost):
            body = await read_body(request, limits)
            image_request = normalize(
                body.fields,
                body.uploads,
                endpoint=endpoint,
                rules=snapshot.rules_for(team.name),
                form=body.form,
                from_sdk=sdk_client(
                    request.headers.get("x-stainless-lang"), request.headers.get("User-Agent")
                ),
            )
            del body  # the normalized request keeps what it needs; the rest can go
        if image_request.end_user is None and END_USER_HEADER in request.headers:
            end_user = end_user_label(request.headers[END_USER_HEADER])
            image_request = replace(image_request, end_user=end_user)
        _describe(record, image_request, settings.log.prompts)
        now = app[CLOCK]()
        period = period_at(team.period, now, settings.server.tz)
        job = Job(
            request_id=request[LEDGER_ID],
            team=team,
            request=image_request,
            path=request.path,
            query={"async": "1"} if mode == "async" else {},  # the upstream's own spelling
            mode=mode,
            fingerprint=fingerprint(
                image_request, async_mode=mode == "async", key_fp=key.fingerprint
            ),
            period=period,
            now=now,
            slot=request[SLOT],
            key=key,
            reuse_key=reuse_key(image_request, team.name),
            retry_count=retry_count,
        )
        record["ledger_id"] = job.request_id
        window_s = choose(
            request.headers.get(CACHE_HEADER),
            team.reuse_identical_s,
            app[RESULTS].enabled and mode == "sync",
        )
        if window_s is not None:
            record["cache"] = "bypass"  # until the store is asked
        outcome = await _dispatch(request, job, idempotency_key, settings, window_s=window_s)
    settling = app[GENERATIONS].settling(job.request_id)  # None unless it ran a generation
    if settling is not None:
        request[SETTLING] = settling  # the log line waits for the money
    return await respond(request, outcome, image_request, team, settings, now=job.now)


async def get_task(request: web.Request) -> web.Response:
    """GET /v1/images/tasks/{task_id}: the owner's view of an async task."""
    record = request[RECORD]
    record.update(endpoint="tasks", mode="poll")
    team, _ = _caller(request, request.app[CONFIG].current)
    task_id = path_id(request, "task_id", "No task with that id was found.")
    record["task_id"] = record["upstream_id"] = short_id(task_id)
    answer = await request.app[TASKS].poll(team.name, task_id, request[SLOT])
    return respond_task(request, answer)


async def result_file(request: web.Request) -> web.StreamResponse:
    """GET /v1/images/files/...: a result image streamed from the upstream (proxy_results).

    Like the upstream's own result URLs it needs no key: the path is the credential, which is
    also why it is logged only as a short hash.
    """
    record = request[RECORD]
    record.update(endpoint="files", path=FILES_PATH + "…")
    query = file_query(request.query)
    upstream = request.app[ROUTING].config(query[0] if query else None)
    if upstream is None or not upstream.proxy_results:
        raise NotFound("Result proxying is off; use the result URL as given.")
    path = request.raw_path.partition("?")[0]
    if query is None or not is_result_path(path, query[1]):
        raise NotFound("Not a result image path.")
    url = upstream.files_origin + path + (f"?{query[1]}" if query[1] else "")
    record.update(result_ids=[result_id(url)], upstream=upstream.name)
    try:
        found = await request.app[RESULTS].file(url, upstream.name)
    except Expired:
        raise _gone() from None
    except DownloadError as exc:
        raise NotFound(f"The result image could not be fetched: {exc}.") from None
    if found is not None:
        return stored_image(found, {"X-Request-ID": record["request_id"]})
    try:
        async with request.app[DOWNLOADER].open_image(url) as image:
            response = web.StreamResponse(
                headers={
                    "Content-Type": image.headers.get("Content-Type", "application/octet-stream"),
                    "Cache-Control": "private, max-age=86400",
                    "X-Request-ID": record["request_id"],
                }
            )
            if image.content_length is not None:
                response.content_length = image.content_length
            await response.prepare(request)
            try:
                async for chunk in image.content.iter_chunked(FILE_CHUNK):
                    await response.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:  # too late for an error answer:
                record["error_type"] = "upstream_error"  # the short body tells the client
                log.warning("result image stream broke off: %s", type(exc).__name__)
                return response
    except DownloadError as exc:
        raise NotFound(f"The result image could not be fetched: {exc}.") from None
    await response.write_eof()
    return response


def stored_image(found: Found, headers: dict[str, str]) -> web.StreamResponse:
    """An image from the result store: its file (sent by the kernel), or bytes just fetched."""
    headers = {"Content-Type": found.kind, "Cache-Control": "private, max-age=86400", **headers}
    if found.path is not None:
        return web.FileResponse(found.path, headers=headers)
    return web.Response(body=found.data, headers=headers)


def _gone() -> Gone:
    return Gone("This result image was deleted from the gateway's store (by its team, a purge, "
                "or after keep_days).")  # fmt: skip


async def delete_result(request: web.Request) -> web.Response:
    """DELETE /v1/images/results/{request_id}: the owning team deletes a request's images from
    the store at once (another team's request, or an unknown one: 404; already deleted: 410).
    The ledger keeps its entry."""
    record = request[RECORD]
    record["endpoint"] = "results"
    team, _ = _caller(request, request.app[CONFIG].current)
    unknown = "No request of your team has that id."
    request_id = path_id(request, "request_id", unknown)
    db = request.app[DB]
    entry = await db.find_entry(request_id)
    if entry is None or entry.request_id != request_id or entry.team != team.name:
        raise NotFound(unknown, param="request_id")
    record["ledger_id"] = request_id
    urls = result_urls((await db.stored_results([request_id])).get(request_id))
    if not urls:
        raise NotFound("That request has no result images.", param="request_id")
    deleted = await request.app[RESULTS].delete_request(request_id, team.name, urls)
    if deleted is None:
        raise _gone()
    record["images"] = deleted
    return json_response({"object": "result.deleted", "request_id": request_id, "deleted": deleted})


async def list_models(request: web.Request) -> web.Response:
    request[RECORD]["endpoint"] = "models"
    snapshot = request.app[CONFIG].current
    _caller(request, snapshot)
    names = [UPSTREAM_MODEL, *sorted(snapshot.settings.model_aliases)]
    return json_response(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "image-gateway"}
                for name in names
            ],
        }
    )


async def team_usage(request: web.Request) -> web.Response:
    """GET /v1/gateway/usage: the caller's team (and key) in its current period."""
    request[RECORD]["endpoint"] = "usage"
    snapshot = request.app[CONFIG].current
    team, key = _caller(request, snapshot)
    figures = await standing(
        request.app[DB], snapshot.settings, team, request.app[CLOCK](), key=key
    )
    return json_response(figures.as_json())


def _caller(request: web.Request, snapshot: Snapshot) -> tuple[TeamConfig, KeyConfig]:
    """The team and key of the request's bearer key (401 for none, unknown or expired)."""
    try:
        key = snapshot.team_keys.require(request.headers.get("Authorization"))
    except Unauthorized:
        request[RECORD]["team"] = None
        raise
    request[RECORD].update(team=key.team, key=key.identity)  # an expired key is named too
    check_expiry(key, request.app[CLOCK]())
    return snapshot.settings.teams[key.team], key


@contextlib.asynccontextmanager
async def _admitted(request: web.Request, team: TeamConfig, key: KeyConfig) -> AsyncIterator[None]:
    """Inside the team's and the key's rpm and max_concurrent limits, or 429."""
    limited = scopes(team, key)
    if not any(s.rpm is not None or s.max_concurrent is not None for s in limited):
        yield
        return
    db, request_id = request.app[DB], request[LEDGER_ID]
    try:
        await db.admit(request_id, limited, request.app[CLOCK]().timestamp())
    except StorageUnavailable:  # it may have committed all the same: give the slot back
        await asyncio.shield(_release(request.app, request_id, limited))
        raise
    try:
        yield
    finally:
        await asyncio.shield(_release(request.app, request_id, limited))


async def _release(app: web.Application, request_id: str, limited: list[Scope]) -> None:
    """Never raises: the request's answer (maybe a paid image) must not become an error
    because its admission could not be given back at once."""
    db = app[DB]
    try:
        await db.release(request_id, limited)
    except StorageUnavailable:
        app[DURABLE].later(
            f"admission release of {request_id}", lambda: db.release(request_id, limited)
        )
    except Exception:
        log.exception("releasing the admission of %s failed", request_id)


def path_id(request: web.Request, name: str, unknown: str) -> str:
    """An id from the URL, or 404: no id the gateway hands out is this long or holds a control
    character (which no database column is obliged to store: PostgreSQL text refuses NUL)."""
    value = request.match_info[name]
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise NotFound(unknown, param=name)
    return value


def _retry_count(request: web.Request, record: dict[str, Any]) -> int:
    raw = request.headers.get(RETRY_HEADER)
    digits = raw is not None and raw.isascii() and raw.isdigit() and len(raw) < 6
    count = int(raw) if digits and raw is not None else 0
    record["retry_count"] = count
    return count


def _describe(record: dict[str, Any], req: ImageRequest, log_prompts: bool) -> None:
    record.update(
        model=req.model,
        requested_model=req.requested_model,
        n=req.n,
        size=req.size,
        resolution=req.resolution,
        quality=req.quality,
        refs=len(req.references),
        ignored_params=list(req.ignored),
        end_user=req.end_user,
    )
    if log_prompts:
        record["prompt"] = req.prompt


async def _dispatch(
    request: web.Request, job: Job, key: str | None, settings: Settings, *, window_s: float | None
) -> Outcome:
    app = request.app
    if key is None and job.retry_count < 1 and (not window_s or job.reuse_key is None):
        return await app[GENERATIONS].run(job)  # the common case: no closures held for its wait
    dedupe_s = settings.idempotency.retry_dedupe_minutes * 60

    async def fresh() -> Outcome:
        if not window_s or job.reuse_key is None:
            return await generate()
        since = job.now.timestamp() - window_s
        outcome, status = await app[REUSE].run(
            job.request_id,
            job.team.name,
            job.reuse_key,
            since,
            generate=generate,
            settled=lambda outcome: _settled(app, outcome.request_id),
            kept=lambda outcome: app[RESULTS].kept(outcome.request_id),
        )
        request[RECORD]["cache"] = status
        if status == "hit":
            request[RECORD].update(ledger_id=None, upstream=None)
        return outcome

    async def generate() -> Outcome:
        return await app[GENERATIONS].answer(job, dedupe_window_s=dedupe_s)

    if key is None:
        return await fresh()
    request[RECORD]["idempotency"] = "new"
    scoped = f"{job.key.fingerprint}:{key}" if job.key is not None else key  # per API key
    outcome = await app[IDEMPOTENCY].run(
        job.team.name, scoped, job.fingerprint, job.request_id, fresh
    )
    if isinstance(outcome, Replay):
        request[RECORD]["idempotency"] = "replayed"
    return outcome


async def _settled(app: web.Application, request_id: str) -> None:
    """Until a generation's settlement is committed (for the identical requests waiting on it:
    then its stored answer is theirs)."""
    settling = app[GENERATIONS].settling(request_id)
    if settling is not None:
        await asyncio.wait([settling])

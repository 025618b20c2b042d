"""A signed-in team's own result images, from the result store (else streamed from the
upstream) through the console.

The page holds only ``/console/images/<ledger id>/<n>``: the result URL (a credential) is read
from the ledger's stored answer here and never reaches the browser.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from gateway.core.errors import GatewayError, NotFound, PermissionDenied, Unauthorized
from gateway.core.results import result_urls
from gateway.http.console.render import error_page
from gateway.http.console.session import viewer
from gateway.http.handlers import path_id, stored_image
from gateway.http.keys import DB, DOWNLOADER, RECORD, RESULTS
from gateway.ops.accesslog import result_id
from gateway.services.console import result_count
from gateway.services.results import Expired
from gateway.upstream.base import DownloadError

log = logging.getLogger("gateway")

CHUNK = 64 * 1024
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
MAX_INDEX_DIGITS = 2


async def image(request: web.Request) -> web.StreamResponse:
    """GET /console/images/{request_id}/{index}: 403 for another team's entry."""
    request[RECORD]["endpoint"] = "console"
    who = viewer(request)
    try:
        if who is None:
            raise Unauthorized("Sign in to the console first.", code="not_signed_in")
        url = await _result_url(request, who.team.name if who.team else None)
        found = await request.app[RESULTS].file(url)
    except Expired:
        return error_page(request, NotFound("That image was deleted from the gateway."), who)
    except DownloadError as exc:
        return error_page(request, NotFound(f"The image could not be fetched: {exc}."), who)
    except GatewayError as exc:
        return error_page(request, exc, who)
    if found is not None:
        return stored_image(found, {})
    return await _stream(request, url)


async def _result_url(request: web.Request, team: str | None) -> str:
    """The URL of the image asked for, if the viewer may see it (an admin: any team's)."""
    unknown = "No image of yours has that id."
    request_id = path_id(request, "request_id", unknown)
    index = request.match_info["index"]
    if not (index.isascii() and index.isdigit() and len(index) <= MAX_INDEX_DIGITS):
        raise NotFound(unknown)
    db = request.app[DB]
    entry = await db.find_entry(request_id)
    if entry is None or entry.request_id != request_id:
        raise NotFound(unknown)
    if team is not None and entry.team != team:
        raise PermissionDenied("That image belongs to another team.")
    stored = (await db.stored_results([request_id])).get(request_id)
    if int(index) >= result_count(entry, stored):
        raise NotFound(unknown)
    url = result_urls(stored)[int(index)]
    request[RECORD]["result_ids"] = [result_id(url)]
    return url


async def _stream(request: web.Request, url: str) -> web.StreamResponse:
    record = request[RECORD]
    try:
        async with request.app[DOWNLOADER].open_image(url) as upstream:
            kind = upstream.headers.get("Content-Type", "").split(";")[0].strip().lower()
            response = web.StreamResponse(
                headers={
                    "Content-Type": kind if kind in IMAGE_TYPES else "application/octet-stream",
                    "Cache-Control": "private, max-age=86400",
                }
            )
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await response.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:  # too late for an error page
                record["error_type"] = "upstream_error"
                log.warning("console image stream broke off: %s", type(exc).__name__)
                return response
    except DownloadError as exc:
        return error_page(request, NotFound(f"The image could not be fetched: {exc}."), None)
    await response.write_eof()
    return response

"""The HTTP upstream: the one owner of the upstream ``ClientSession``, sending and classifying.

Every failure is sorted by one question: could the upstream have generated (and charged for) the
image? A connection that was never made, or a request the upstream refused to start, is safe to
retry and costs nothing. Anything after the request bytes left is *uncertain*: it is never
retried here, and its hold is never released.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import aiohttp

from gateway.core.config import UpstreamConfig
from gateway.core.errors import UpstreamFailure, UpstreamRejected
from gateway.core.wire import UpstreamBody
from gateway.upstream.base import Reply, SendState
from gateway.upstream.connector import UpstreamConnector, fresh_only
from gateway.upstream.streams import TooLarge, read_capped

SMALL_BODY = 256 * 1024
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # JSON with a few URLs; anything near this is not an answer
RETRYABLE_REFUSALS = (429, 503)


class HttpUpstream:
    """``base.Upstream`` over HTTP, with one upstream's key and timeouts. Every upstream's
    ``HttpUpstream`` shares the app's one session (``new_session``)."""

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        *,
        backoff_s: float = 0.25,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._session = session
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._secret = config.api_key.reveal()
        self._auth = {"Authorization": f"Bearer {self._secret}"}
        self._timeout = aiohttp.ClientTimeout(
            total=config.timeout_s, connect=config.connect_timeout_s
        )
        connector = getattr(session, "connector", None)
        self._connector = connector if isinstance(connector, UpstreamConnector) else None
        if self._connector is not None:
            self._connector.reuse(config.base_url, config.reuse_idle_s)

    @property
    def config(self) -> UpstreamConfig:
        return self._config

    @staticmethod
    def new_session() -> aiohttp.ClientSession:
        """The session every upstream is called through (each request sets its timeouts)."""
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_mark_sent)
        trace.on_request_chunk_sent.append(_count_written)
        connector = UpstreamConnector(limit=0, ttl_dns_cache=300)
        return aiohttp.ClientSession(
            connector=connector,
            trace_configs=[trace],
            auto_decompress=True,
            raise_for_status=False,
        )

    async def submit(
        self,
        path: str,
        body: UpstreamBody,
        query: dict[str, str],
        state: SendState | None = None,
        *,
        retry: bool = True,
    ) -> Reply:
        """POST a generation; retry only what provably never started (``retry=False``: never,
        the caller tries another upstream instead).

        Every error raised carries ``upstream_ms`` (time since the first send, when anything was
        sent) and ``upstream_status`` (when the upstream answered).
        """
        url = self._config.base_url + path
        state = state or SendState()
        state.length = body.length
        attempts = self._config.max_attempts if retry else 1
        for attempt in range(1, attempts + 1):
            state.attempts, state.sent, state.written = attempt, False, 0
            try:
                with fresh_only(attempt > 1):  # a retry never rides a pooled connection
                    return await self._post_once(url, body, query, state)
            except _NotSent as exc:
                if attempt == attempts:
                    failure = UpstreamFailure(
                        f"The upstream could not be reached ({exc}); nothing was sent or charged.",
                        code="upstream_unreachable",
                        uncertain=False,
                    )
                    failure.attempts = attempt
                    raise failure from None
                state.sent = False
                await self._sleep(self._jitter(attempt))
            except _RefusedToStart as exc:
                wait = exc.retry_after
                if attempt == attempts or wait is None or wait > self._config.retry_after_cap_s:
                    exc.error.attempts = attempt
                    exc.error.retry_after = wait
                    raise exc.error from None
                await self._sleep(wait + random.uniform(0, 0.1))
                state.sent = False  # it refused to start: that send generated nothing
            except (UpstreamFailure, UpstreamRejected) as exc:
                exc.attempts = attempt
                if state.sent:
                    exc.upstream_ms = state.elapsed_ms()
                raise
        raise AssertionError("unreachable: every attempt returns or raises")

    async def get_task(self, task_id: str) -> Reply:
        """Ask the upstream about one async task (GET; harmless to repeat)."""
        url = f"{self._config.base_url}/v1/images/tasks/{quote(task_id, safe='')}"
        state = SendState()
        try:
            async with self._session.get(
                url,
                headers=self._auth,
                trace_request_ctx=state,
                allow_redirects=False,
                timeout=self._timeout,
            ) as resp:
                raw = await self._read_answer(resp, uncertain=False)
                return _classify(
                    resp.status, resp.headers, raw, state, expect="task", secret=self._secret
                )
        except _RefusedToStart as exc:
            raise exc.error from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamFailure(
                f"The upstream did not answer the task query ({_describe(exc)}).",
                code="upstream_unreachable",
                uncertain=False,
            ) from None

    async def _post_once(
        self, url: str, body: UpstreamBody, query: dict[str, str], state: SendState
    ) -> Reply:
        headers = {
            **self._auth,
            "Content-Type": "application/json",
            "Content-Length": str(body.length),
        }
        data: bytes | AsyncIterator[bytes | memoryview]
        data = b"".join(body.chunks()) if body.length <= SMALL_BODY else _stream(body)
        try:
            async with self._session.post(
                url,
                params=query,
                data=data,
                headers=headers,
                trace_request_ctx=state,
                allow_redirects=False,  # never re-send a paid request to another origin
                timeout=self._timeout,
            ) as resp:
                raw = await self._read_answer(resp, uncertain=True)
                return _classify(
                    resp.status, resp.headers, raw, state, expect="generation", secret=self._secret
                )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise _NotSent(_describe(exc)) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not state.whole:  # never read whole by the upstream: it started nothing
                raise _NotSent(_describe(exc)) from None
            timed_out = isinstance(exc, TimeoutError)
            raise UpstreamFailure(
                (
                    "The upstream did not answer in time"
                    if timed_out
                    else "The connection to the upstream broke after the request was sent "
                    f"({_describe(exc)})"
                )
                + "; the image may have been generated. Do not retry blindly: "
                "check your usage or the request id with your admin.",
                status=504 if timed_out else 502,
                code="upstream_timeout" if timed_out else "upstream_connection_lost",
                uncertain=True,
            ) from None

    async def _read_answer(self, resp: aiohttp.ClientResponse, *, uncertain: bool) -> bytes:
        """The answer's body, capped, with the central key scrubbed from every byte of it.

        The upstream's strings go on to teams, logs and the database; should it ever echo the
        key (in a message, a type, a code, a task field), it stops here.
        """
        if self._connector is not None:
            self._connector.learn(resp.url, resp.headers)
        try:
            raw = bytes(await read_capped(resp.content, MAX_ANSWER_BYTES))
        except TooLarge:
            resp.close()
            failure = UpstreamFailure(
                f"The upstream's answer was larger than {MAX_ANSWER_BYTES} bytes; the gateway "
                "refused it."
                + (
                    " The image may have been generated. Do not retry blindly." if uncertain else ""
                ),
                code="upstream_answer_too_large",
                uncertain=uncertain,
            )
            failure.upstream_status = resp.status
            raise failure from None
        return scrub(raw, self._secret)

    def _jitter(self, attempt: int) -> float:
        return float(self._backoff_s * (2 ** (attempt - 1)) * random.uniform(0.5, 1.0))


class _NotSent(Exception):
    pass


class _RefusedToStart(Exception):
    def __init__(self, error: UpstreamRejected, retry_after: float | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


async def _mark_sent(
    _session: aiohttp.ClientSession, context: SimpleNamespace, _params: object
) -> None:
    state = context.trace_request_ctx
    if isinstance(state, SendState):
        state.sent = True


async def _count_written(
    _session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
) -> None:
    """Called before each body chunk is written: the count may run ahead of the socket, never
    behind it, so a count short of the body proves the upstream never had all of it."""
    state = context.trace_request_ctx
    if isinstance(state, SendState):
        state.written += len(params.chunk)


async def _stream(body: UpstreamBody) -> AsyncIterator[bytes | memoryview]:
    for chunk in body.chunks():
        yield chunk
        await asyncio.sleep(0)


def _classify(
    status: int, headers: Any, raw: bytes, state: SendState, *, expect: str, secret: str
) -> Reply:
    elapsed = state.elapsed_ms()
    payload, changed = _json_object(raw, secret)
    if payload is not None and changed:
        raw = json.dumps(payload, ensure_ascii=False).encode()  # what is passed on is clean
    if status in (200, 202) and payload is not None and _well_formed(status, payload, expect):
        return Reply(status, payload, raw, elapsed, state.attempts)
    try:
        _raise_for(status, headers, payload)
    except (UpstreamFailure, UpstreamRejected, _RefusedToStart) as exc:
        error = exc.error if isinstance(exc, _RefusedToStart) else exc
        error.upstream_status, error.upstream_ms = status, elapsed
        raise
    raise AssertionError("unreachable: _raise_for always raises")


def _raise_for(status: int, headers: Any, payload: dict[str, Any] | None) -> None:
    if status < 400:
        raise UpstreamFailure(
            f"The upstream answered HTTP {status} with a body the gateway cannot read; the image "
            "may have been generated. Do not retry blindly.",
            code="upstream_bad_response",
            uncertain=True,
        )
    error = payload.get("error") if payload is not None else None
    retry_after = _retry_after(headers.get("Retry-After"))
    if (
        isinstance(error, dict)
        or status < 500
        or (status in RETRYABLE_REFUSALS and retry_after is not None)
    ):
        rejected = _rejected(status, error if isinstance(error, dict) else {})
    else:
        raise UpstreamFailure(
            f"The upstream's edge answered HTTP {status} without an API error; the image may "
            "have been generated. Do not retry blindly.",
            status=504 if status == 504 else 502,
            code="upstream_bad_gateway",
            uncertain=True,
        )
    if status in RETRYABLE_REFUSALS:
        raise _RefusedToStart(rejected, retry_after)
    raise rejected


def _rejected(status: int, error: dict[str, Any]) -> UpstreamRejected:
    message = str(
        error.get("message")
        or f"The upstream refused the request (HTTP {status}); nothing was generated."
    )
    type_ = str(error.get("type") or "upstream_error")
    code = error.get("code") or ("upstream_refused" if not error else None)
    param = error.get("param")
    if status == 402:
        # The provider's balance or quota is used up: the gateway's account, not the team's
        # budget, and nothing a retry fixes until an administrator tops it up. (The upstream's
        # health logs it once, as it disables the upstream.)
        rejected = UpstreamRejected(
            502,
            "upstream_error",
            "The upstream account has no balance or quota left; an administrator must top it "
            "up. Nothing was charged.",
            code="upstream_quota_exhausted",
        )
        rejected.should_retry = False
        return rejected
    if status == 401:
        # The upstream refused the gateway's own key; "your key is wrong" would mislead the team.
        return UpstreamRejected(
            502,
            "upstream_error",
            "The upstream refused the gateway's credentials; an administrator must fix the "
            "central key. Nothing was charged.",
            code="upstream_auth_failed",
        )
    return UpstreamRejected(
        status,
        type_,
        message,
        code=code if isinstance(code, str) else None,
        param=param if isinstance(param, str) else None,
    )


def scrub(raw: bytes, secret: str) -> bytes:
    """``raw`` without the central key, also in its JSON-escaped form (``\\/``)."""
    if not secret:
        return raw
    for form in {secret, json.dumps(secret)[1:-1]}:
        raw = raw.replace(form.encode(), b"sk_\xe2\x80\xa6")
    return raw


def _well_formed(status: int, payload: dict[str, Any], expect: str) -> bool:
    if expect == "task":
        return isinstance(payload.get("task_id"), str) and isinstance(payload.get("status"), str)
    if status == 202:
        return isinstance(payload.get("task_id"), str)
    data = payload.get("data")
    return isinstance(data, list) and all(
        isinstance(item, dict) and isinstance(item.get("url"), str) for item in data
    )


def _json_object(raw: bytes, secret: str) -> tuple[dict[str, Any] | None, bool]:
    """The answer as an object with every string made safe (see ``_clean_text``), and whether
    cleaning changed anything; None for anything but a JSON object."""
    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            return None, False
        changed: list[bool] = []
        cleaned = _clean(value, secret, changed)
    except (ValueError, RecursionError):
        return None, False
    return cleaned, bool(changed)


def _clean(value: Any, secret: str, changed: list[bool]) -> Any:
    if isinstance(value, str):
        text = _clean_text(value, secret)
        if text != value:
            changed.append(True)
        return text
    if isinstance(value, dict):
        return {_clean(k, secret, changed): _clean(v, secret, changed) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(item, secret, changed) for item in value]
    return value


def _clean_text(text: str, secret: str) -> str:
    """An upstream string as the gateway may keep and pass it on: without the central key in
    any JSON spelling (``\\u`` escapes decode back to it), without NUL (PostgreSQL text cannot
    hold it) and without lone surrogates (no database encodes them)."""
    if secret and secret in text:
        text = text.replace(secret, "sk_\u2026")
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error.strerror or type(exc.os_error).__name__}"
    return type(exc).__name__

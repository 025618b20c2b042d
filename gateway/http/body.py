"""Read an images request body (JSON, multipart or urlencoded) into fields and uploads.

Limits are enforced while reading: the whole body, each file, each text field, and the number of
references. Past any of them the reading stops and the client gets 413 (or 400), so an oversized
upload is never held in memory. A JSON body is scanned chunk by chunk as it arrives
(``jsonsplit``): its data URLs are checked on the way and kept as the bytes they came as, so no
step holds the event loop for longer than one chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.core.errors import (
    ClientClosedRequest,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from gateway.core.images import sniff_image_type
from gateway.core.normalize import MAX_REFERENCES, REFERENCE_FIELDS, Upload
from gateway.http.jsonsplit import Splitter, may_hold_references, resolve
from gateway.http.offload import digest
from gateway.upstream.streams import TooLarge, read_capped

FILE_FIELDS = ("image", "image[]", "mask", "mask[]")
MAX_FIELD_BYTES = 1024 * 1024
PART_CHUNK = 256 * 1024  # aiohttp's default of 8 KiB costs ~9,000 loop steps per 72 MB
LIST_FIELD_SUFFIX = "[]"
SMALL_JSON = 64 * 1024  # a JSON body is kept whole up to this, unscanned while it needs no scan


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_body_bytes: int
    max_image_bytes: int


@dataclass(frozen=True, slots=True)
class Body:
    fields: dict[str, Any]
    uploads: list[Upload]
    form: bool  # the fields are text (multipart or urlencoded), not typed JSON


async def read_body(request: web.Request, limits: BodyLimits) -> Body:
    """The request's fields and uploaded files; raises a 4xx GatewayError for anything malformed.

    A client that disconnects mid-body makes aiohttp fail the read with ConnectionResetError
    (set on the payload by RequestHandler.connection_lost): that is the client's abort, 499.
    """
    try:
        return await _read_body(request, limits)
    except ConnectionResetError:
        raise ClientClosedRequest(
            "The client closed the connection before its request body arrived."
        ) from None


async def _read_body(request: web.Request, limits: BodyLimits) -> Body:
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise _too_large(limits.max_body_bytes)
    ctype = request.content_type
    if ctype == "multipart/form-data":
        return Body(*await _read_multipart(request, limits), form=True)
    if ctype == "application/json" or ctype.endswith("+json"):
        return Body(await _read_json(request, limits), [], form=False)
    if ctype == "application/x-www-form-urlencoded":
        text = await _read_text(request, limits)
        if text.lstrip().startswith("{"):
            return Body(_json_fields(text), [], form=False)  # curl -d '{...}' without -H
        return Body(_form_fields(text), [], form=True)
    raise UnsupportedMediaType(
        f"Content-Type {ctype or '(none)'} is not supported; send application/json or "
        "multipart/form-data.",
        param="Content-Type",
    )


async def _read_json(request: web.Request, limits: BodyLimits) -> dict[str, Any]:
    """The JSON body's fields, its data URL references as ``DataUrl`` values.

    A small body with no reference key in it (a generation's, most edits' by URL) is kept
    whole instead of scanned: the scan's skeleton of it would be the body itself. The first
    chunk with a reference key in it, or past ``SMALL_JSON``, starts the scan as before.
    """
    splitter: Splitter | None = None
    head = bytearray()
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
        if total > limits.max_body_bytes:
            raise _too_large(limits.max_body_bytes)
        if splitter is not None:
            splitter.feed(chunk)
            continue
        head += chunk
        if total > SMALL_JSON or may_hold_references(head):
            splitter = Splitter(limits.max_image_bytes)
            splitter.feed(head)
            head = bytearray()
    skeleton = head if splitter is None else splitter.finish()
    try:
        text = skeleton.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not UTF-8 text.", code="invalid_json") from None
    del skeleton
    fields = _json_fields(text)
    if splitter is None:
        return fields
    references = {
        name: replace(ref, digest=await digest(ref.parts()))
        for name, ref in splitter.references.items()
    }
    resolve(fields, references)
    return fields


async def _read_text(request: web.Request, limits: BodyLimits) -> str:
    """The body as text. Its bytes are dropped as soon as they are decoded: with the text and
    then the parsed values alive at once, a large JSON body peaks near twice its size."""
    try:
        raw = await read_capped(request.content, limits.max_body_bytes)
    except TooLarge:
        raise _too_large(limits.max_body_bytes) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not UTF-8 text.", code="invalid_json") from None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")


def _json_fields(text: str) -> dict[str, Any]:
    if not text.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidRequest("The JSON body is nested too deeply.", code="invalid_json") from None
    except ValueError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest("The JSON body must be an object.", code="invalid_json")
    return value


def _form_fields(text: str) -> dict[str, Any]:
    pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
    fields: dict[str, Any] = {}
    for name, value in pairs:
        _add_field(fields, name, value)
    return fields


def _add_field(fields: dict[str, Any], name: str, value: str) -> None:
    base = name.removesuffix(LIST_FIELD_SUFFIX)
    if base in REFERENCE_FIELDS:
        fields.setdefault(base, []).append(value)
        return
    if name in fields:
        raise InvalidRequest(f"The field {name} was sent more than once.", param=name)
    fields[name] = value


async def _read_multipart(
    request: web.Request, limits: BodyLimits
) -> tuple[dict[str, Any], list[Upload]]:
    fields: dict[str, Any] = {}
    uploads: list[Upload] = []
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if isinstance(part, MultipartReader):
                raise InvalidRequest(
                    "Nested multipart bodies are not supported.", code="invalid_multipart"
                )
            name = part.name or ""
            if name in FILE_FIELDS or part.filename is not None:
                uploads.append(
                    await _read_file(part, name, f"image[{len(uploads)}]", request, limits)
                )
                if len(uploads) > MAX_REFERENCES + 1:  # +1: a mask is refused later, by name
                    raise InvalidRequest(
                        f"At most {MAX_REFERENCES} reference images are allowed.", param="image[]"
                    )
            else:
                data = await _read_part(
                    part, MAX_FIELD_BYTES, f"the field {name!r}", request, limits
                )
                try:
                    _add_field(fields, name, data.decode("utf-8"))
                except UnicodeDecodeError:
                    raise InvalidRequest(
                        f"The field {name!r} is not UTF-8 text.", param=name
                    ) from None
    except (ValueError, AssertionError, RuntimeError, LookupError, HttpProcessingError) as exc:
        raise InvalidRequest(
            f"The multipart body is malformed ({exc or type(exc).__name__}).",
            code="invalid_multipart",
        ) from None
    return fields, uploads


async def _read_file(
    part: BodyPartReader, name: str, param: str, request: web.Request, limits: BodyLimits
) -> Upload:
    if name not in FILE_FIELDS:
        raise InvalidRequest(
            f"Unexpected file part {name!r}; reference images go in 'image' or 'image[]'.",
            param=name,
        )
    data = await _read_part(part, limits.max_image_bytes, f"the image {param}", request, limits)
    if name.startswith("mask"):
        return Upload(field="mask", filename=part.filename, mime="", data=b"")
    mime = sniff_image_type(data)
    if mime is None:
        raise InvalidRequest(
            f"{param} is not a PNG, JPEG, WebP or GIF image (judged by its content).", param=param
        )
    return Upload(
        field=name, filename=part.filename, mime=mime, data=data, digest=await digest((data,))
    )


async def _read_part(
    part: BodyPartReader, limit: int, what: str, request: web.Request, limits: BodyLimits
) -> bytearray:
    """The part's bytes, grown in place chunk by chunk: one ``b"".join`` of a 12 MB file held
    the loop for ~7 ms, most of it faulting in the fresh pages at once."""
    data = bytearray()
    while chunk := await part.read_chunk(PART_CHUNK):
        if len(data) + len(chunk) > limit:
            raise PayloadTooLarge(f"{what[0].upper()}{what[1:]} is larger than {limit} bytes.")
        if request.content.total_bytes > limits.max_body_bytes:
            raise _too_large(limits.max_body_bytes)
        data += chunk
    return data

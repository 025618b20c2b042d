"""The bytes sent upstream for an ``ImageRequest``, and the fingerprint that identifies a request.

Uploaded files are base64-encoded while the body is being sent, a slice at a time, so a request
with sixteen 4 MB uploads never holds a second, encoded copy of them in memory. Data URLs that
came in a JSON body go out as the bytes they arrived as (``DataUrl``), a slice at a time.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from gateway.core.dataurls import DataUrl
from gateway.core.normalize import ImageRequest, Reference

ENCODE_SLICE = 3 * 64 * 1024  # a multiple of 3, so slices encode without padding; ~0.15 ms each
SEND_SLICE = 256 * 1024

Buffer = bytes | bytearray | memoryview


def sha256_of(parts: Sequence[Buffer]) -> bytes:
    """The sha256 of ``parts`` concatenated (``hashlib`` releases the GIL on large buffers)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


@dataclass(frozen=True, slots=True)
class UpstreamBody:
    """A JSON body of known length that can be produced any number of times (once per attempt)."""

    request: ImageRequest
    length: int

    def chunks(self) -> Iterator[bytes | memoryview]:
        head, refs = _head_and_refs(self.request)
        yield head
        if refs:
            yield b',"image_urls":['
            for index, ref in enumerate(refs):
                if index:
                    yield b","
                yield from _reference_chunks(ref)
            yield b"]"
        yield b"}"


def upstream_body(request: ImageRequest) -> UpstreamBody:
    head, refs = _head_and_refs(request)
    length = len(head) + 1
    if refs:
        length += len(b',"image_urls":[') + len(refs) - 1 + 1
        length += sum(_reference_length(ref) for ref in refs)
    return UpstreamBody(request, length)


def fingerprint(request: ImageRequest, *, async_mode: bool, key_fp: str) -> str:
    """A digest of everything that decides what is generated and returned, for dedupe, and of
    the key that asks: a retry never collects what another key of the team paid for."""
    digest = hashlib.sha256()
    meta = {
        **request.upstream_fields(),
        "endpoint": request.endpoint,
        "response_format": request.response_format,
        "async": async_mode,
        "key": key_fp,
    }
    digest.update(json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
    for ref in request.references:
        digest.update(b"\x00" + reference_digest(ref))
    return digest.hexdigest()


def reuse_key(request: ImageRequest, team: str) -> str:
    """What makes two requests the same for the opt-in cache: the team, the endpoint and every
    field sent upstream, uploaded references by the hash of their content, URL ones by their
    text (the gateway never fetches them). Not the answer's format, which the gateway makes
    from the same images, nor the key, which pays from the same budget."""
    digest = hashlib.sha256()
    meta = {**request.upstream_fields(), "endpoint": request.endpoint, "team": team}
    digest.update(json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
    for ref in request.references:
        digest.update(b"\x00" + reference_digest(ref))
    return digest.hexdigest()


def reference_digest(ref: Reference) -> bytes:
    """The sha256 of an upload's bytes or a URL's text (a ``DataUrl`` hashes as its ``str``),
    precomputed off the loop where the body reader did so."""
    if isinstance(ref, str):
        return hashlib.sha256(ref.encode()).digest()
    if ref.digest:
        return ref.digest
    return sha256_of(ref.parts() if isinstance(ref, DataUrl) else (ref.data,))


def _head_and_refs(request: ImageRequest) -> tuple[bytes, tuple[Reference, ...]]:
    text = json.dumps(request.upstream_fields(), ensure_ascii=False, separators=(",", ":"))
    return text[:-1].encode(), request.references


def _reference_chunks(ref: Reference) -> Iterator[bytes | memoryview]:
    if isinstance(ref, str):
        yield json.dumps(ref).encode()
        return
    if isinstance(ref, DataUrl):  # plain base64: already valid JSON string content
        yield f'"{ref.prefix}'.encode()
        view = memoryview(ref.payload)
        for start in range(0, len(view), SEND_SLICE):
            yield view[start : start + SEND_SLICE]
        yield b'"'
        return
    yield f'"data:{ref.mime};base64,'.encode()
    view = memoryview(ref.data)
    for start in range(0, len(view), ENCODE_SLICE):
        yield base64.b64encode(view[start : start + ENCODE_SLICE])
    yield b'"'


def _reference_length(ref: Reference) -> int:
    if isinstance(ref, str):
        return len(json.dumps(ref).encode())
    if isinstance(ref, DataUrl):
        return ref.length + 2
    return len(f'"data:{ref.mime};base64,') + 4 * ((len(ref.data) + 2) // 3) + 1

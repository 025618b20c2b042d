"""Split a JSON images body while it streams in: data URL references out, the rest kept as text.

Pure (bytes in, bytes and values out). The scanner follows the JSON structure only as deep as
references sit (``image_urls[i]``, ``image_input[i]``, ``images[i].image_url``). There, a
``data:image/...;base64,`` string goes to a ``DataUrlBuilder`` slice by slice and leaves a
placeholder in the *skeleton*, the body minus those strings, which ``json.loads`` parses at the
end in microseconds. Everything else is copied to the skeleton verbatim, so the skeleton is valid
JSON exactly when the body is, and parses to the same values.

Two rules act before the body is complete: a 17th reference is refused as it starts, without
reading or decoding the rest, and so is a data URL whose text is already past the image limit.
A body with more than ``MAX_TOKENS`` tokens (never a real request) stops being scanned and is
copied whole for ``json.loads``; so is any data URL string that is not plain base64 (escapes other
than ``\\/``, other characters): there the ordinary checks decide, exactly as before.

A body in which no reference key can sit (``may_hold_references`` false: none of their names,
no escape that could spell one) needs no scan at all: its skeleton is the body itself.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from gateway.core.dataurls import DataUrl, DataUrlBuilder, ImageTooLarge
from gateway.core.errors import InvalidRequest, PayloadTooLarge

MAX_REFERENCES = 16
MAX_TOKENS = 10_000
REFERENCE_ARRAYS = ("image_urls", "image_input")
IMAGES = "images"
IMAGE_URL = "image_url"
MAX_KEY_BYTES = 64
PREFIX_BYTES = 24  # the longest raw prefix below
RAW_PREFIXES: dict[bytes, str] = {
    raw.encode(): f"data:image/{mime};base64,"
    for mime in ("png", "jpeg", "webp", "gif")
    for raw in (f"data:image/{mime};base64,", f"data:image\\/{mime};base64,")
}
TOKEN = re.compile(rb'[ \t\r\n,:]*+(?:(")|([\[{])|([\]}])|[^ \t\r\n,:\[\]{}"]++)')
SEPARATORS = re.compile(rb"[ \t\r\n,:]*+")
STRING_BODY = re.compile(rb'(?:[^"\\]++|\\.)*+', re.S)
QUOTE, BACKSLASH, SLASH, OBJECT = ord('"'), ord("\\"), ord("/"), ord("{")
MARKERS = (*(f'"{name}"'.encode() for name in (*REFERENCE_ARRAYS, IMAGES)), b"\\")


class TooManyReferences(InvalidRequest):
    """A 17th reference began; raised before anything of it is read."""


@dataclass(slots=True)
class _Frame:
    kind: int  # ord("{") or ord("[")
    role: str  # "top", "refs", "images", "image" or "other"
    field: str = ""  # refs/images: the top-level key; image: its images index
    key: str | None = None  # objects: the key of the member being read
    expect_key: bool = True
    items: int = 0  # arrays: elements begun


@dataclass(slots=True)
class _String:
    role: str  # "key", "ref" or "plain"
    param: str = ""
    mode: str = "inline"  # "undecided" (ref, prefix not seen yet), "clean" or "inline"
    builder: DataUrlBuilder | None = None
    key: bytearray | None = None


class Splitter:
    """Feed chunks, then ``finish()`` for the skeleton and the references it stands for."""

    def __init__(self, max_image_bytes: int) -> None:
        self._max_image = max_image_bytes
        self._buf = bytearray()
        self._skeleton = bytearray()
        self._frames: list[_Frame] = []
        self._string: _String | None = None
        self._counts: dict[str, int] = {}
        self._tokens = 0
        self._plain = False
        self._token = ""  # drawn with the first reference: most bodies have none
        self.references: dict[str, DataUrl] = {}

    def feed(self, chunk: bytes | bytearray) -> None:
        """Scan ``chunk``; raises InvalidRequest for a 17th reference or an oversized image."""
        if self._plain:
            self._skeleton += chunk
            return
        self._buf += chunk
        done = self._run(final=False)
        del self._buf[:done]

    def finish(self) -> bytearray:
        """The skeleton: the body with each data URL reference replaced by a placeholder."""
        if not self._plain:
            done = self._run(final=True)
            string = self._string
            if string is not None and string.builder is not None:  # unterminated: invalid JSON
                self._skeleton += b'"' + string.builder.text
            self._skeleton += self._buf[done:]
        self._buf = bytearray()
        return self._skeleton

    def _run(self, *, final: bool) -> int:
        buf, at = self._buf, 0
        while at < len(buf):
            if self._string is not None:
                at = self._in_string(at, final)
                if self._string is not None:
                    return at
                continue
            if self._plain:
                self._skeleton += buf[at:]
                return len(buf)
            match = TOKEN.match(buf, at)
            if match is None:  # separators only
                end = SEPARATORS.match(buf, at).end()  # type: ignore[union-attr]
                self._skeleton += buf[at:end]
                return end
            scalar = not (match[1] or match[2] or match[3])  # a number, true, false, null
            if scalar and match.end() == len(buf) and not final:
                return at  # it may go on in the next chunk
            self._tokens += 1
            if self._tokens > MAX_TOKENS:
                self._plain = True
                continue
            at = self._token_at(match, at)
        return at

    def _token_at(self, match: re.Match[bytes], at: int) -> int:
        if match[1]:
            self._skeleton += self._buf[at : match.start(1)]
            self._open_string()
        elif match[2]:
            self._skeleton += self._buf[at : match.end()]
            self._open_container(self._buf[match.start(2)])
        elif match[3]:
            self._skeleton += self._buf[at : match.end()]
            if self._frames:
                self._frames.pop()
            self._value_done()
        else:
            self._skeleton += self._buf[at : match.end()]
            self._value_starts()
            self._value_done()
        return match.end()

    # -- structure

    def _value_starts(self) -> tuple[_Frame | None, str]:
        """Count an array element where references are; the parent frame and the key or index
        this value sits at."""
        frame = self._frames[-1] if self._frames else None
        if frame is None:
            return None, ""
        if frame.kind == OBJECT:
            return frame, frame.key or ""
        frame.items += 1
        if frame.role in ("refs", "images"):
            self._counts[frame.field] = frame.items
            if sum(self._counts.values()) > MAX_REFERENCES:
                raise TooManyReferences(
                    f"At most {MAX_REFERENCES} reference images are allowed; "
                    f"got more than {MAX_REFERENCES}.",
                    param="image_urls",
                )
        return frame, str(frame.items - 1)

    def _value_done(self) -> None:
        if self._frames and self._frames[-1].kind == OBJECT:
            self._frames[-1].expect_key = True

    def _open_container(self, kind: int) -> None:
        parent, at = self._value_starts()
        role, field = "other", ""
        if parent is None:
            role = "top" if kind == OBJECT else "other"
        elif parent.role == "top" and kind != OBJECT and at in (*REFERENCE_ARRAYS, IMAGES):
            role, field = ("images" if at == IMAGES else "refs"), at
        elif parent.role == "images" and kind == OBJECT:
            role, field = "image", at
        self._frames.append(_Frame(kind, role, field))

    def _open_string(self) -> None:
        frame = self._frames[-1] if self._frames else None
        if frame is not None and frame.kind == OBJECT and frame.expect_key:
            self._string = _String("key", key=bytearray())
            self._skeleton += b'"'
            return
        parent, at = self._value_starts()
        param = ""
        if parent is not None and parent.role == "refs":
            param = f"{parent.field}[{at}]"
        elif parent is not None and parent.role == "image" and at == IMAGE_URL:
            param = f"images[{parent.field}]"
        if param:
            self._string = _String("ref", param, mode="undecided")
        else:
            self._string = _String("plain")
            self._skeleton += b'"'

    def _string_done(self, string: _String) -> None:
        self._string = None
        frame = self._frames[-1] if self._frames else None
        if string.role != "key" or frame is None:
            self._value_done()
            return
        frame.key = _decode_key(string.key)
        frame.expect_key = False
        if frame.role == "top" and frame.key in (*REFERENCE_ARRAYS, IMAGES):
            self._counts[frame.key] = 0  # a repeated key replaces the earlier value

    # -- strings

    def _in_string(self, at: int, final: bool) -> int:
        string = self._string
        assert string is not None
        buf = self._buf
        if string.mode == "undecided":
            if len(buf) - at < PREFIX_BYTES and not final:
                return at
            string.mode = "inline"
            for raw, prefix in RAW_PREFIXES.items():
                if buf.startswith(raw, at):
                    string.mode, string.builder = "clean", DataUrlBuilder(prefix, self._max_image)
                    at += len(raw)
                    break
            else:
                self._skeleton += b'"'
        if string.mode == "clean":
            return self._in_clean(string, at)
        return self._in_inline(string, at)

    def _in_inline(self, string: _String, at: int) -> int:
        buf = self._buf
        end = STRING_BODY.match(buf, at).end()  # type: ignore[union-attr]
        self._skeleton += buf[at:end]
        if string.key is not None and len(string.key) <= MAX_KEY_BYTES:
            string.key += buf[at : min(end, at + MAX_KEY_BYTES + 1)]
        if end < len(buf) and buf[end] == QUOTE:
            self._skeleton += b'"'
            self._string_done(string)
            return end + 1
        return end  # a trailing backslash stays for the next chunk

    def _in_clean(self, string: _String, at: int) -> int:
        buf = self._buf
        builder = string.builder
        assert builder is not None
        quote = buf.find(b'"', at)
        end = quote if quote >= 0 else len(buf)
        while True:
            escape = buf.find(b"\\", at, end)
            stop = escape if escape >= 0 else end
            if not self._feed(string, buf[at:stop]):
                return self._fall_back(string, at)
            at = stop
            if escape < 0:
                break
            if escape + 1 == len(buf):
                return escape  # the escaped character is in the next chunk
            if buf[escape + 1] != SLASH or not self._feed(string, b"/"):
                return self._fall_back(string, escape)
            at = escape + 2
        if quote < 0:
            return len(buf)
        reference = builder.finish()
        self._token = self._token or secrets.token_hex(8)
        name = f"\x00igw:{self._token}:{len(self.references)}"
        self.references[name] = reference
        self._skeleton += json.dumps(name).encode()
        self._string_done(string)
        return quote + 1

    def _feed(self, string: _String, data: bytes | bytearray) -> bool:
        assert string.builder is not None
        try:
            return string.builder.feed(data)
        except ImageTooLarge as exc:  # 413, as for an uploaded file over the same limit
            raise PayloadTooLarge(f"{string.param}: {exc}.", param=string.param) from None

    def _fall_back(self, string: _String, at: int) -> int:
        """Not plain base64 after all: the string goes to the skeleton, for the ordinary check."""
        assert string.builder is not None
        self._skeleton += b'"' + string.builder.text
        string.mode, string.builder = "inline", None
        return self._in_inline(string, at)


def may_hold_references(body: bytes | bytearray) -> bool:
    """Whether ``Splitter`` could find a reference in ``body`` (a prefix of it, or the whole):
    a reference sits under one of the keys, which JSON spells literally or with an escape."""
    return any(marker in body for marker in MARKERS)


def _decode_key(raw: bytearray | None) -> str | None:
    if raw is None or len(raw) > MAX_KEY_BYTES:
        return None
    try:
        key = json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
    return key if isinstance(key, str) else None


def resolve(fields: dict[str, Any], references: dict[str, DataUrl]) -> None:
    """Put each reference back where its placeholder is (only reference positions hold one)."""
    if not references:
        return
    for name in REFERENCE_ARRAYS:
        value = fields.get(name)
        if isinstance(value, list):
            fields[name] = [
                references.get(item, item) if isinstance(item, str) else item for item in value
            ]
    images = fields.get(IMAGES)
    if isinstance(images, list):
        for item in images:
            if isinstance(item, dict) and isinstance(item.get(IMAGE_URL), str):
                item[IMAGE_URL] = references.get(item[IMAGE_URL], item[IMAGE_URL])

"""A data URL reference checked while its bytes stream in, kept as the bytes it arrived as.

Decoding a 16 MB base64 string to validate it, then encoding it again to send it on, costs two
copies and ~100 ms of the event loop held at once. Instead the base64 text is checked a slice
at a time (strict RFC 4648, exactly what ``binascii.a2b_base64(strict_mode=True)`` accepts) and
passed upstream unchanged: it already is valid JSON string content. Its sha256 (for the
request's fingerprint) is left to ``offload.digest``, off the event loop.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field

BASE64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


@dataclass(frozen=True, slots=True)
class DataUrl:
    """A ``data:image/...;base64,`` reference: its prefix, its base64 text (padding included,
    never mutated once built), why the upstream would refuse it (None when it is valid), and
    once known the sha256 of the whole URL (the same as of the equivalent ``str``)."""

    prefix: str
    payload: bytearray = field(repr=False)
    problem: str | None = None
    digest: bytes = field(default=b"", repr=False)
    too_large: bool = False  # the problem is the image's size (413, like an uploaded file)

    @property
    def length(self) -> int:
        return len(self.prefix) + len(self.payload)

    def parts(self) -> tuple[bytes, bytearray]:
        """The URL's text in two pieces, for hashing without joining them."""
        return self.prefix.encode(), self.payload


class ImageTooLarge(ValueError):
    """The base64 text already says the image is larger than the limit."""


class DataUrlBuilder:
    """Accumulates the base64 part of one data URL, checking it as it comes.

    ``feed`` returns False as soon as a character is neither base64 nor padding: the caller then
    decodes the whole string the ordinary way. Otherwise the verdict is the strict decoder's own:
    up to the first ``=`` the text is plain base64, which every strict decoder accepts, so only
    the tail from the last whole quad before it is decoded, by ``binascii`` itself (starting on
    a quad of data leaves the decoder in the state it has at that point of the whole text).
    """

    def __init__(self, prefix: str, max_image_bytes: int) -> None:
        self._prefix = prefix
        self._max = max_image_bytes
        self._payload = bytearray()
        self._first_pad = -1

    @property
    def text(self) -> bytes:
        """What has been accepted so far (prefix and base64), for the fallback."""
        return self._prefix.encode() + self._payload

    def feed(self, data: bytes | bytearray) -> bool:
        """Accept ``data`` (JSON escapes already resolved) or return False; ImageTooLarge once
        the text is past the limit (the cheap bound ``check_data_url`` applies before decoding)."""
        if data.translate(None, BASE64_CHARS):
            return False
        if (len(self._payload) + len(data)) // 4 * 3 > self._max + 3:
            raise ImageTooLarge(f"image is larger than {self._max} bytes")
        if self._first_pad < 0 and (found := data.find(b"=")) >= 0:
            self._first_pad = len(self._payload) + found
        self._payload += data
        return True

    def finish(self) -> DataUrl:
        """The reference, with the verdict ``images.check_data_url`` gives on the whole URL."""
        plain = len(self._payload) if self._first_pad < 0 else self._first_pad
        aligned = max(0, plain // 4 - 1) * 4
        problem, too_large = None, False
        try:
            tail = binascii.a2b_base64(self._payload[aligned:], strict_mode=True)
        except (binascii.Error, ValueError):
            problem = "data URL is not valid base64"
        else:
            size = aligned // 4 * 3 + len(tail)
            if not size:
                problem = "data URL is empty"
            elif size > self._max:
                problem, too_large = f"image is larger than {self._max} bytes", True
        return DataUrl(self._prefix, self._payload, problem, too_large=too_large)

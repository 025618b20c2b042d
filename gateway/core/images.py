"""Reference images: what the upstream accepts, decided from content rather than client claims."""

from __future__ import annotations

import binascii
import re
from urllib.parse import urlsplit

MIME_BY_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
DATA_URL_PREFIX = re.compile(r"data:image/(png|jpeg|webp|gif);base64,")
MAX_URL_LENGTH = 8192


class BadReference(ValueError):
    """A reference image the upstream would refuse; the message says why."""


class ReferenceTooLarge(BadReference):
    """A data URL's image is over ``max_image_mb`` (413, like an uploaded file)."""


def sniff_image_type(data: bytes | bytearray) -> str | None:
    """The MIME type named by the file's magic bytes, or None if it is not PNG/JPEG/WebP/GIF."""
    for magic, mime in MIME_BY_MAGIC:
        if data.startswith(magic):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_reference(value: object, max_image_bytes: int) -> str:
    """Return ``value`` if it is an https URL with a host or a valid image data URL."""
    if not isinstance(value, str):
        raise BadReference(f"must be a string, got {type(value).__name__}")
    if value.startswith("data:"):
        check_data_url(value, max_image_bytes)
        return value
    if len(value) > MAX_URL_LENGTH:
        raise BadReference(f"URL longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise BadReference("URL contains whitespace or control characters")
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError as exc:
        raise BadReference("is not a valid URL") from exc
    if parts.scheme.lower() != "https" or not host:
        raise BadReference("must be an https:// URL with a host or a data:image/...;base64, URL")
    return value


def check_data_url(value: str, max_image_bytes: int) -> None:
    match = DATA_URL_PREFIX.match(value)
    if match is None:
        raise BadReference("data URLs must start with data:image/(png|jpeg|webp|gif);base64,")
    payload = value[match.end() :]
    # Four base64 characters carry three bytes: a cheap bound before decoding anything.
    if len(payload) // 4 * 3 > max_image_bytes + 3:
        raise ReferenceTooLarge(f"image is larger than {max_image_bytes} bytes")
    try:
        decoded = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise BadReference("data URL is not valid base64") from exc
    if not decoded:
        raise BadReference("data URL is empty")
    if len(decoded) > max_image_bytes:
        raise ReferenceTooLarge(f"image is larger than {max_image_bytes} bytes")

"""Turn what a client sent into exactly what the upstream documents, or say precisely what is wrong.

Pure: takes the decoded fields of a JSON or multipart body and returns an ``ImageRequest``;
no HTTP, no database. Every refusal is an ``InvalidRequest`` naming the parameter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Literal

from gateway.core.dataurls import DataUrl
from gateway.core.errors import InvalidRequest
from gateway.core.images import BadReference, check_reference

UPSTREAM_MODEL = "gpt-image-2"
RATIOS: tuple[str, ...] = (
    "1:1", "3:2", "2:3", "4:3", "3:4", "5:4", "4:5",
    "16:9", "9:16", "2:1", "1:2", "21:9", "9:21",
)  # fmt: skip
RATIO_LOGS = tuple(
    (ratio, math.log(int(ratio.split(":")[0]) / int(ratio.split(":")[1]))) for ratio in RATIOS
)
RESOLUTIONS = ("1k", "2k")
QUALITIES = ("low", "medium", "high", "auto")
QUALITY_ALIASES = {"standard": "medium", "hd": "high"}
MAX_N = 10
MAX_REFERENCES = 16
MAX_PROMPT_CHARS = 32_000
MAX_PIXEL_SIDE = 16_384
TWO_K_SIDE = 2048
MAX_IGNORED = 20
MAX_NAME = 40
REFERENCE_FIELDS = ("image_urls", "image_input")
PIXEL_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
KNOWN_FIELDS = frozenset(
    {"model", "prompt", "n", "size", "resolution", "quality", "stream", "images", "response_format"}
).union(REFERENCE_FIELDS)
MAX_END_USER = 64
TRUE_TEXT = ("true", "1", "yes")
FALSE_TEXT = ("false", "0", "no")

Endpoint = Literal["generations", "edits"]


@dataclass(frozen=True, slots=True)
class Upload:
    """An uploaded reference file; ``mime`` comes from its magic bytes, never the client."""

    field: str
    filename: str | None
    mime: str
    data: bytes | bytearray = dataclass_field(repr=False)
    digest: bytes = dataclass_field(default=b"", repr=False)  # sha256 of data, when already known


Reference = str | Upload | DataUrl


@dataclass(frozen=True, slots=True)
class ImageRequest:
    endpoint: Endpoint
    model: str
    requested_model: str
    prompt: str = dataclass_field(repr=False)
    n: int
    size: str
    resolution: str
    quality: str
    references: tuple[Reference, ...] = dataclass_field(repr=False)
    response_format: Literal["url", "b64_json"]
    ignored: tuple[str, ...]
    end_user: str | None = None  # OpenAI's ``user``: recorded (and named as ignored), not sent

    def upstream_fields(self) -> dict[str, Any]:
        """The documented upstream fields except the references, in a stable order."""
        return {
            "model": self.model,
            "prompt": self.prompt,
            "n": self.n,
            "size": self.size,
            "resolution": self.resolution,
            "quality": self.quality,
        }


@dataclass(frozen=True, slots=True)
class Rules:
    """What normalization needs from the config."""

    max_image_bytes: int
    model_aliases: Mapping[str, str]
    default_response_format: Literal["url", "b64_json"] = "url"


def normalize(
    fields: Mapping[str, Any],
    uploads: Sequence[Upload],
    *,
    endpoint: Endpoint,
    rules: Rules,
    form: bool = False,
) -> ImageRequest:
    """Validate and normalize one images request.

    ``form`` says the fields came from a multipart or urlencoded body, where every value is
    text: only then are ``n`` and ``stream`` read from strings.
    """
    if "mask" in fields or any(u.field == "mask" for u in uploads):
        raise InvalidRequest(
            "The upstream does not support masks; send the image only.", param="mask"
        )
    if _flag(fields.get("stream"), "stream", form):
        raise InvalidRequest(
            "Streaming is not supported; omit stream or set it to false.", param="stream"
        )
    requested_model, model = _model(fields.get("model"), rules.model_aliases)
    size, pixel_2k = _size(fields.get("size"))
    resolution = _resolution(fields.get("resolution"), pixel_2k)
    references = _references(fields, uploads, rules.max_image_bytes)
    ignored = _ignored_names(fields)
    return ImageRequest(
        endpoint=endpoint,
        model=model,
        requested_model=requested_model,
        prompt=_prompt(fields.get("prompt")),
        n=_n(fields.get("n"), form),
        size=size,
        resolution=resolution,
        quality=_quality(fields.get("quality")),
        references=references,
        response_format=_response_format(
            fields.get("response_format"), rules.default_response_format
        ),
        ignored=ignored,
        end_user=_end_user(fields.get("user")),
    )


def end_user_label(value: str) -> str | None:
    """An end user's id as records keep it: control characters removed, at most 64 chars."""
    cleaned = "".join(ch for ch in value if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF)
    return cleaned.strip()[:MAX_END_USER] or None


def _end_user(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("user must be a string (your end user's id).", param="user")
    return end_user_label(value)


def _ignored_names(fields: Mapping[str, Any]) -> tuple[str, ...]:
    """The dropped parameters' names, fit for a response header and a log line: printable
    ASCII only (others become ``?``), each cut to 40 characters, at most 20 of them."""
    names = sorted(
        "".join(ch if " " <= ch <= "~" and ch != "," else "?" for ch in name)[:MAX_NAME]
        for name in fields
        if name not in KNOWN_FIELDS
    )
    return tuple(names[:MAX_IGNORED]) + (("…",) if len(names) > MAX_IGNORED else ())


def nearest_ratio(width: int, height: int) -> str:
    """The supported ratio nearest ``width:height`` on a log scale (2:1 and 1:2 are symmetric)."""
    target = math.log(width / height)
    return min(RATIO_LOGS, key=lambda pair: abs(pair[1] - target))[0]


def _model(value: object, aliases: Mapping[str, str]) -> tuple[str, str]:
    if value is None:
        return UPSTREAM_MODEL, UPSTREAM_MODEL
    if not isinstance(value, str):
        raise InvalidRequest("model must be a string.", param="model")
    if value == UPSTREAM_MODEL:
        return value, value
    if value in aliases:
        return value, aliases[value]
    names = ", ".join([UPSTREAM_MODEL, *sorted(aliases)])
    raise InvalidRequest(
        f"The model {value!r} is not served here; use one of: {names}.",
        param="model",
        code="model_not_found",
    )


def _prompt(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest("prompt is required and must be a non-empty string.", param="prompt")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"prompt is longer than {MAX_PROMPT_CHARS} characters.", param="prompt"
        )
    if not _is_unicode(value):
        raise InvalidRequest(
            "prompt is not valid Unicode (a lone surrogate escape).", param="prompt"
        )
    return value


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates: JSON lets "\\ud800" through, UTF-8 cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _n(value: object, form: bool) -> int:
    if value is None:
        return 1
    if form and isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_N:
        raise InvalidRequest(f"n must be an integer from 1 to {MAX_N}.", param="n")
    return value


def _size(value: object) -> tuple[str, bool]:
    """The ratio to send, and whether a pixel size asked for 2k."""
    if value is None or value == "auto":
        return "1:1", False
    if isinstance(value, str):
        if value in RATIOS:
            return value, False
        match = PIXEL_SIZE.fullmatch(value)
        if match:
            width, height = int(match[1]), int(match[2])
            if 0 < width <= MAX_PIXEL_SIDE and 0 < height <= MAX_PIXEL_SIDE:
                return nearest_ratio(width, height), max(width, height) >= TWO_K_SIDE
    raise InvalidRequest(
        f"size must be auto, a pixel size such as 1536x1024, or one of: {', '.join(RATIOS)}.",
        param="size",
    )


def _resolution(value: object, pixel_2k: bool) -> str:
    if value is None:
        return "2k" if pixel_2k else "1k"
    if value in RESOLUTIONS:
        return str(value)
    raise InvalidRequest("resolution must be 1k or 2k.", param="resolution")


def _quality(value: object) -> str:
    if value is None:
        return "medium"
    if isinstance(value, str):
        if value in QUALITIES:
            return value
        if value in QUALITY_ALIASES:
            return QUALITY_ALIASES[value]
    raise InvalidRequest(
        "quality must be one of low, medium, high, auto (or OpenAI's standard, hd).",
        param="quality",
    )


def _response_format(
    value: object, default: Literal["url", "b64_json"]
) -> Literal["url", "b64_json"]:
    if value is None:
        return default
    if value == "url":
        return "url"
    if value == "b64_json":
        return "b64_json"
    raise InvalidRequest("response_format must be url or b64_json.", param="response_format")


def _flag(value: object, name: str, form: bool) -> bool:
    if value is None or value is False:
        return False
    if value is True:
        return True
    if form and isinstance(value, str) and value.lower() in TRUE_TEXT + FALSE_TEXT:
        return value.lower() in TRUE_TEXT
    raise InvalidRequest(f"{name} must be a boolean.", param=name)


def _references(
    fields: Mapping[str, Any], uploads: Sequence[Upload], max_image_bytes: int
) -> tuple[Reference, ...]:
    _count_references(fields, uploads)
    refs: list[Reference] = []
    for name in REFERENCE_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if not isinstance(value, list):
            raise InvalidRequest(f"{name} must be a list of image URLs.", param=name)
        for index, item in enumerate(value):
            refs.append(_checked(item, f"{name}[{index}]", max_image_bytes))
    refs.extend(_openai_images(fields.get("images"), max_image_bytes))
    refs.extend(u for u in uploads if u.field != "mask")
    return tuple(refs)


def _count_references(fields: Mapping[str, Any], uploads: Sequence[Upload]) -> None:
    """Refuse more than 16 references before checking (decoding) any of them."""
    count = sum(u.field != "mask" for u in uploads)
    for name in (*REFERENCE_FIELDS, "images"):
        value = fields.get(name)
        count += len(value) if isinstance(value, list) else 0
    if count > MAX_REFERENCES:
        raise InvalidRequest(
            f"At most {MAX_REFERENCES} reference images are allowed; got {count}.",
            param="image_urls",
        )


def _openai_images(value: object, max_image_bytes: int) -> list[str | DataUrl]:
    """OpenAI's JSON edits shape ``images: [{"image_url": ...}]``; no file ids (no file store)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest('images must be a list of {"image_url": ...} objects.', param="images")
    refs = []
    for index, item in enumerate(value):
        param = f"images[{index}]"
        if isinstance(item, dict) and "file_id" in item:
            raise InvalidRequest(
                f"{param}: file_id references are not supported (the upstream has no file store); "
                "send image_url instead.",
                param=param,
            )
        if not isinstance(item, dict) or "image_url" not in item:
            raise InvalidRequest(f'{param} must be an object with "image_url".', param=param)
        refs.append(_checked(item["image_url"], param, max_image_bytes))
    return refs


def _checked(value: object, param: str, max_image_bytes: int) -> str | DataUrl:
    if isinstance(value, DataUrl):  # checked while the body streamed in
        if value.problem is not None:
            raise InvalidRequest(f"{param}: {value.problem}.", param=param)
        return value
    try:
        return check_reference(value, max_image_bytes)
    except BadReference as exc:
        raise InvalidRequest(f"{param}: {exc}.", param=param) from None

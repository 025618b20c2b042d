"""Normalization as a pure function: what goes upstream for every accepted shape."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from gateway.core.config import DEFAULT_ALIASES
from gateway.core.errors import InvalidRequest, PayloadTooLarge
from gateway.core.normalize import RATIOS, Rules, Upload, nearest_ratio, normalize, sdk_client
from gateway.core.wire import fingerprint, upstream_body
from tests.conftest import PNG

RULES = Rules(max_image_bytes=1024 * 1024, model_aliases=DEFAULT_ALIASES)


def norm(
    fields: dict,
    uploads: list[Upload] | None = None,
    form: bool = False,
    endpoint: str = "generations",
):
    return normalize(fields, uploads or [], endpoint=endpoint, rules=RULES, form=form)


@pytest.mark.parametrize(
    ("size", "ratio", "resolution"),
    [
        ("1536x1024", "3:2", "1k"),
        ("1024x1536", "2:3", "1k"),
        ("1792x1024", "16:9", "1k"),
        ("1024x1792", "9:16", "1k"),
        ("512x512", "1:1", "1k"),
        ("256x256", "1:1", "1k"),
        ("2048x2048", "1:1", "2k"),
        ("2560x1080", "21:9", "2k"),
        ("2700x1000", "21:9", "2k"),  # about 10 % beyond 21:9 on a log scale: still 21:9
        ("1000x2700", "9:21", "2k"),
        ("1000x2000", "1:2", "1k"),
        ("1280x1024", "5:4", "1k"),
        ("auto", "1:1", "1k"),
        ("16:9", "16:9", "1k"),
    ],
)
def test_sizes(size: str, ratio: str, resolution: str) -> None:
    request = norm({"prompt": "x", "size": size})
    assert (request.size, request.resolution) == (ratio, resolution)


@pytest.mark.parametrize("size", ["999x1", "1x999", "10000x10", "3000x1000", "1000x3000"])
def test_a_size_no_supported_ratio_is_near_is_refused(size: str) -> None:
    """Issue 20: ``999x1`` used to be generated at 21:9 (and charged) without a word."""
    with pytest.raises(InvalidRequest) as excinfo:
        norm({"prompt": "x", "size": size})
    error = excinfo.value
    assert (error.status, error.code, error.param) == (400, "invalid_size", "size")
    assert all(ratio in error.message for ratio in RATIOS)


def test_explicit_resolution_wins_over_pixel_size() -> None:
    assert norm({"prompt": "x", "size": "2048x2048", "resolution": "1k"}).resolution == "1k"


def test_every_ratio_maps_to_itself() -> None:
    for ratio in RATIOS:
        w, h = (int(v) for v in ratio.split(":"))
        assert nearest_ratio(w * 100, h * 100) == ratio


@pytest.mark.parametrize(
    ("quality", "expected"),
    [(None, "medium"), ("standard", "medium"), ("hd", "high"), ("low", "low"), ("auto", "auto")],
)
def test_quality(quality: str | None, expected: str) -> None:
    fields = {"prompt": "x"} if quality is None else {"prompt": "x", "quality": quality}
    assert norm(fields).quality == expected


def test_defaults_are_explicit() -> None:
    request = norm({"prompt": "x"})
    assert request.upstream_fields() == {
        "model": "gpt-image-2",
        "prompt": "x",
        "n": 1,
        "size": "1:1",
        "resolution": "1k",
        "quality": "medium",
    }


def test_aliases_map_to_gpt_image_2() -> None:
    request = norm({"prompt": "x", "model": "dall-e-3"})
    assert (request.model, request.requested_model) == ("gpt-image-2", "dall-e-3")


@pytest.mark.parametrize(
    "model",
    [
        "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "dall-e-2", "dall-e-3",
        "gpt-image-2-2026-04-21", "gpt-image-2-2027-01-31",  # any dated snapshot
        "gpt-image-2.5-flare", "gpt-image-2.5-sunburst", "chatgpt-image-latest",
        "gpt-image-2.5-flare-2026-09-08", "gpt-image-2.5-sunburst-2026-12-01",
        "gpt-image-2.6-flare", "gpt-image-2.6-sunburst",
    ],
)  # fmt: skip
def test_current_openai_model_names_are_served_by_default(model: str) -> None:
    request = norm({"prompt": "x", "model": model})
    assert (request.model, request.requested_model) == ("gpt-image-2", model)


@pytest.mark.parametrize(
    "model", ["gpt-image-2-2026-13-01", "gpt-image-2-2026-02-30", "gpt-image-3", "gpt-image-2-"]
)
def test_not_a_snapshot_or_unknown_model_is_refused(model: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        norm({"prompt": "x", "model": model})
    assert (excinfo.value.code, excinfo.value.param) == ("model_not_found", "model")


def test_configured_aliases_replace_the_defaults_but_not_the_upstream_model() -> None:
    rules = Rules(1024, {"house-model": "gpt-image-2"})

    def model(name: str) -> str:
        return normalize(
            {"prompt": "x", "model": name}, [], endpoint="generations", rules=rules
        ).model

    assert model("house-model") == model("house-model-2026-01-01") == "gpt-image-2"
    assert model("gpt-image-2-2026-04-21") == "gpt-image-2"  # the upstream's own, always
    with pytest.raises(InvalidRequest):
        model("gpt-image-1")


def test_references_merge_in_order_with_uploads_last() -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    upload = Upload("image[]", "a.png", "image/png", PNG)
    request = norm(
        {
            "prompt": "x",
            "image_input": ["https://b.example/2.png"],
            "image_urls": ["https://a.example/1.png", data_url],
            "images": [{"image_url": "https://c.example/3.png"}],
        },
        [upload],
        endpoint="edits",
    )
    assert request.references == (
        "https://a.example/1.png",
        data_url,
        "https://b.example/2.png",
        "https://c.example/3.png",
        upload,
    )


def test_form_fields_are_text() -> None:
    request = norm({"prompt": "x", "n": "3", "stream": "false"}, form=True)
    assert request.n == 3
    with pytest.raises(InvalidRequest) as excinfo:
        norm({"prompt": "x", "n": "3"})
    assert excinfo.value.param == "n"
    with pytest.raises(InvalidRequest):
        norm({"prompt": "x", "stream": "true"}, form=True)


def test_ignored_params_are_named_sorted() -> None:
    request = norm({"prompt": "x", "user": "u", "background": "opaque", "response_format": "url"})
    assert request.ignored == ("background", "user")


def test_sdk_clients_are_known_by_their_headers() -> None:
    assert sdk_client("python", "OpenAI/Python 3.57.0")
    assert sdk_client("js", None)
    assert sdk_client(None, "ai/6.0.333 ai-sdk/openai/3.0.141 runtime/node.js/v20.20.2")
    assert not sdk_client(None, "curl/8.5.0")
    assert not sdk_client(None, None)


@pytest.mark.parametrize(
    ("fields", "from_sdk", "expected"),
    [
        ({"model": "gpt-image-1"}, True, "both"),
        ({"model": "gpt-image-2"}, True, "both"),  # the upstream's own name is a GPT-image one
        ({"model": "chatgpt-image-latest"}, True, "both"),
        ({"model": "gpt-image-2-2026-04-21"}, True, "both"),
        ({"model": "gpt-image-1"}, False, "url"),  # curl, <img src>: the upstream's shape
        ({"model": "dall-e-3"}, True, "url"),  # DALL-E answers url by default at OpenAI too
        ({}, True, "url"),  # no model named
        ({"model": "gpt-image-1", "response_format": "url"}, True, "url"),  # asked: exactly that
        ({"model": "gpt-image-1", "response_format": "b64_json"}, False, "b64_json"),
        ({"model": "dall-e-2", "response_format": "b64_json"}, True, "b64_json"),
    ],
)
def test_auto_response_format(fields: dict, from_sdk: bool, expected: str) -> None:
    request = normalize(
        {"prompt": "x", **fields}, [], endpoint="generations", rules=RULES, from_sdk=from_sdk
    )
    assert request.response_format == expected


def test_team_default_response_format() -> None:
    rules = Rules(1024, DEFAULT_ALIASES, default_response_format="b64_json")
    assert (
        normalize({"prompt": "x"}, [], endpoint="generations", rules=rules).response_format
        == "b64_json"
    )
    explicit = normalize(
        {"prompt": "x", "response_format": "url"}, [], endpoint="generations", rules=rules
    )
    assert explicit.response_format == "url"
    for default in ("url", "b64_json"):  # a team's explicit default holds for SDKs too
        rules = Rules(1024, DEFAULT_ALIASES, default_response_format=default)  # type: ignore[arg-type]
        fields = {"prompt": "x", "model": "gpt-image-1"}
        request = normalize(fields, [], endpoint="generations", rules=rules, from_sdk=True)
        assert request.response_format == default


def test_data_url_over_the_image_cap() -> None:
    rules = Rules(max_image_bytes=10, model_aliases={})
    big = "data:image/png;base64," + base64.b64encode(PNG).decode()
    with pytest.raises(PayloadTooLarge) as excinfo:  # 413, as for an uploaded file
        normalize({"prompt": "x", "image_urls": [big]}, [], endpoint="edits", rules=rules)
    assert excinfo.value.param == "image_urls[0]" and excinfo.value.status == 413


def test_upstream_body_streams_uploads_with_exact_length() -> None:
    upload = Upload("image", "a.png", "image/png", PNG * 5000)
    request = norm(
        {"prompt": 'héllo "quoted"', "image_urls": ["https://a.example/x.png"]}, [upload]
    )
    body = upstream_body(request)
    raw = b"".join(body.chunks())
    assert len(raw) == body.length
    decoded = json.loads(raw)
    assert decoded["prompt"] == 'héllo "quoted"'
    assert decoded["image_urls"][0] == "https://a.example/x.png"
    assert (
        decoded["image_urls"][1] == "data:image/png;base64," + base64.b64encode(PNG * 5000).decode()
    )


def test_fingerprint_tracks_what_is_generated() -> None:
    def fp(request: Any, *, async_mode: bool = False, key_fp: str = "k1") -> str:
        return fingerprint(request, async_mode=async_mode, key_fp=key_fp)

    base = norm({"prompt": "x"})
    assert fp(base) == fp(norm({"prompt": "x", "user": "u"}))
    assert fp(base) != fp(base, async_mode=True)
    assert fp(base) != fp(norm({"prompt": "y"}))
    assert fp(base) != fp(base, key_fp="k2")  # another key of the team never collects it
    one = norm({"prompt": "x"}, [Upload("image", None, "image/png", PNG)])
    two = norm({"prompt": "x"}, [Upload("image", None, "image/png", PNG + b"\x00")])
    assert fp(one) != fp(two)


def test_ignored_names_are_safe_for_a_header() -> None:
    odd = norm({"prompt": "x", "\x1f": 1, "a\r\nSet-Cookie: x": 2, "ü,": 3, "k" * 100: 4}).ignored
    assert odd == ("?", "??", "a??Set-Cookie: x", "k" * 40)
    many = norm({"prompt": "x", **{f"extra{i:02d}": i for i in range(30)}}).ignored
    assert len(many) == 21 and many[-1] == "…" and many[0] == "extra00"


def test_too_many_references_are_counted_before_any_is_checked() -> None:
    """Issue 12, item 12: two million tiny references must not be decoded to learn there are
    too many. Every one here is invalid: checking even the first would name it instead."""
    bad = "data:image/png;base64,!!!!"
    with pytest.raises(InvalidRequest) as excinfo:
        norm({"prompt": "x", "image_urls": [bad] * 10, "images": [{"image_url": bad}] * 7})
    assert excinfo.value.param == "image_urls"
    assert "got 17" in excinfo.value.message

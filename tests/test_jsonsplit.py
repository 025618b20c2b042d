"""The streaming JSON scan: same values as ``json.loads`` for any chunking, references kept as
sent, and more than 16 references refused as the 17th begins."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.dataurls import DataUrl
from gateway.core.errors import InvalidRequest, PayloadTooLarge
from gateway.core.normalize import Rules, normalize
from gateway.core.wire import fingerprint, upstream_body
from gateway.http.jsonsplit import (
    MAX_TOKENS,
    Splitter,
    TooManyReferences,
    may_hold_references,
    resolve,
)
from tests.conftest import PNG

RULES = Rules(max_image_bytes=64, model_aliases={})
GOOD = "data:image/png;base64," + base64.b64encode(PNG[:40]).decode()


def split(raw: bytes, cuts: list[int], limit: int = 64) -> dict:
    splitter = Splitter(limit)
    start = 0
    for end in [*sorted(cuts), len(raw)]:
        splitter.feed(raw[start:end])
        start = end
    fields = json.loads(splitter.finish().decode())
    resolve(fields, splitter.references)
    return fields


def outcome(fields: dict) -> tuple[str, ...]:
    """What the upstream would receive, or the refusal's parameter."""
    try:
        request = normalize(fields, [], endpoint="edits", rules=RULES)
    except (InvalidRequest, PayloadTooLarge) as exc:
        return ("refused", str(exc.param))
    body = b"".join(bytes(chunk) for chunk in upstream_body(request).chunks())
    return ("sent", body.decode(), fingerprint(request, async_mode=False, key_fp="k"))


payloads = st.one_of(
    st.just(base64.b64encode(PNG[:40]).decode()),
    st.binary(max_size=50).map(lambda b: base64.b64encode(b).decode()),
    st.text(alphabet="AB+/=!", max_size=12),
)
prefixes = st.sampled_from(
    ["data:image/png;base64,", "data:image\\/gif;base64,", "data:image/tiff;base64,", "data:,"]
)
escapes = st.sampled_from(["", "\\/", "\\u0041", "\\n", "\\\\", '\\"', "é"])
references = st.one_of(
    st.builds(lambda p, b, e, i: '"' + p + b[:i] + e + b[i:] + '"', prefixes, payloads, escapes,
              st.integers(0, 60)),
    st.sampled_from(['"https://a.example/x.png"', '"http://x"', "1", "null", "[]", '{"a": [1]}']),
)  # fmt: skip
image_objects = references.map(lambda r: '{"x": [{"image_url": 1}], "image_url": ' + r + "}")


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    members = ['"prompt": ' + draw(st.sampled_from(['"x"', '""', "7"]))]
    for key in draw(st.lists(st.sampled_from(["image_urls", "image_input", "images", "n"]),
                             unique=True, max_size=3)):  # fmt: skip
        if key == "n":
            members.append('"n" : [1, {"image_urls": ["x"]}, "]"]')
            continue
        items = draw(st.lists(image_objects if key == "images" else references, max_size=9))
        members.append(f'"{key}":[{", ".join(items)}]')
    return ("{" + ", ".join(draw(st.permutations(members))) + "}").encode()


@settings(max_examples=400, deadline=None)
@given(raw=bodies(), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=5))
def test_same_outcome_as_parsing_the_whole_body(raw: bytes, cuts: list[int]) -> None:
    expected = outcome(json.loads(raw))
    try:
        got = outcome(split(raw, [min(c, len(raw)) for c in cuts]))
    except TooManyReferences:
        assert expected == ("refused", "image_urls")
        return
    except PayloadTooLarge as exc:  # refused while streaming: an image already too large
        assert "larger than" in exc.message and expected[0] == "refused"
        return
    assert got == expected


@settings(max_examples=400, deadline=None)
@given(
    raw=st.one_of(
        bodies(),
        st.builds(lambda key, value: json.dumps({key: value}, ensure_ascii=False).encode(),
                  st.text(max_size=12), st.lists(st.text(max_size=30), max_size=3)),
    ),
)  # fmt: skip
def test_a_body_without_a_reference_key_is_its_own_skeleton(raw: bytes) -> None:
    """What lets a small body skip the scan (``gateway.http.body``): wherever a reference
    could be found, ``may_hold_references`` says so."""
    assert may_hold_references(b'{"\\u0069mages": []}')  # an escaped key counts
    if may_hold_references(raw):
        return
    splitter = Splitter(64)
    splitter.feed(raw)
    assert splitter.finish() == raw and splitter.references == {}


def test_data_urls_are_kept_as_sent_even_with_escaped_slashes() -> None:
    escaped = GOOD.replace("/", "\\/")
    raw = f'{{"prompt": "x", "image_urls": ["{GOOD}"], "images": [{{"image_url": "{escaped}"}}]}}'
    fields = split(raw.encode(), [30, 31, 32, 70])
    first, second = fields["image_urls"][0], fields["images"][0]["image_url"]
    assert isinstance(first, DataUrl) and isinstance(second, DataUrl)
    assert first.prefix + first.payload.decode() == GOOD == second.prefix + second.payload.decode()


def test_other_escapes_fall_back_to_the_ordinary_string() -> None:
    fields = split(b'{"image_urls": ["data:image/png;base64,AAA\\u0041"]}', [])
    assert fields["image_urls"] == ["data:image/png;base64,AAAA"]


def test_a_seventeenth_reference_is_refused_as_it_begins() -> None:
    splitter = Splitter(1 << 20)
    head = '{"prompt": "x", "image_urls": [' + ", ".join([f'"{GOOD}"'] * 10) + ", "
    splitter.feed(head.encode())
    splitter.feed(b'"https://a.example/1.png", [], 3, ' + b'"x", ' * 3)
    with pytest.raises(TooManyReferences) as excinfo:
        splitter.feed(b'"data:image/png;base64,!!!')  # the 17th, never finished
    assert excinfo.value.param == "image_urls"
    assert len(splitter.references) == 10  # the 17th was not looked at


def test_a_repeated_key_replaces_its_count() -> None:
    refs = ", ".join([f'"{GOOD}"'] * 10)
    fields = split(f'{{"image_urls": [{refs}], "image_urls": [{refs}]}}'.encode(), [])
    assert len(fields["image_urls"]) == 10


def test_an_oversized_image_is_refused_while_streaming() -> None:
    splitter = Splitter(30)
    with pytest.raises(PayloadTooLarge) as excinfo:  # 413, as for an uploaded file
        splitter.feed(b'{"images": [{"image_url": "data:image/png;base64,' + b"A" * 48)
    assert excinfo.value.param == "images[0]"


def test_pathological_bodies_are_left_to_json_loads() -> None:
    raw = b'{"x": [' + b"1," * (MAX_TOKENS + 10) + b'1], "image_urls": ["' + GOOD.encode() + b'"]}'
    fields = split(raw, [len(raw) // 2])
    assert fields["image_urls"] == [GOOD]  # copied for json.loads, checked the ordinary way

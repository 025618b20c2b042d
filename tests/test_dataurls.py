"""The streamed data URL check gives exactly the verdict of ``images.check_data_url``."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.dataurls import DataUrlBuilder, ImageTooLarge
from gateway.core.images import BadReference, check_data_url
from gateway.core.wire import reference_digest

PREFIX = "data:image/png;base64,"


def whole_verdict(payload: str, limit: int) -> str | None:
    try:
        check_data_url(PREFIX + payload, limit)
    except BadReference as exc:
        return str(exc)
    return None


def streamed_verdict(payload: bytes, limit: int, cuts: list[int]) -> str | None:
    """The builder's verdict, or "fallback" when it hands the string back to the ordinary path."""
    builder = DataUrlBuilder(PREFIX, limit)
    start = 0
    try:
        for end in [*sorted(cuts), len(payload)]:
            if not builder.feed(payload[start:end]):
                return "fallback"
            start = end
    except ImageTooLarge as exc:
        return str(exc)
    return builder.finish().problem


@settings(max_examples=3000, deadline=None)
@given(
    payload=st.text(alphabet="AB+/=", max_size=16) | st.text(alphabet="AB=!\n", max_size=10),
    limit=st.sampled_from([1, 3, 5, 1000]),
    cuts=st.lists(st.integers(min_value=0, max_value=16), max_size=3),
)
def test_same_verdict_as_decoding_the_whole_url(payload: str, limit: int, cuts: list[int]) -> None:
    got = streamed_verdict(payload.encode(), limit, [min(c, len(payload)) for c in cuts])
    if got == "fallback":  # only text that is not plain base64 goes back to the ordinary check
        assert set(payload) - set("AB+/=")
        return
    assert got == whole_verdict(payload, limit)


def test_kept_as_sent_and_hashed_like_the_string() -> None:
    payload = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    builder = DataUrlBuilder(PREFIX, 1 << 20)
    for start in range(0, len(payload), 1000):
        assert builder.feed(payload[start : start + 1000])
    reference = builder.finish()
    assert reference.problem is None and reference.payload == payload
    expected = hashlib.sha256((PREFIX + payload.decode()).encode()).digest()
    assert reference_digest(reference) == expected == reference_digest(PREFIX + payload.decode())


def test_too_large_is_known_before_the_end() -> None:
    builder = DataUrlBuilder(PREFIX, 30)
    assert builder.feed(b"A" * 40)
    with pytest.raises(ImageTooLarge, match="larger than 30 bytes"):
        builder.feed(b"A" * 8)

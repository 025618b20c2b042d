"""An upstream's health as values (gateway.core.health): one row per transition."""

from __future__ import annotations

import pytest

from gateway.core.health import (
    OK,
    Health,
    Policy,
    Verdict,
    abandoned,
    available,
    observe,
    reloaded,
    retry_after,
    take,
)

NOW = 1000.0
POLICY = Policy(cooldown_s=30, max_fails=3, quota_retry_s=3600)
FAIL = Verdict("failure", "HTTP 503")


@pytest.mark.parametrize(
    ("before", "verdict", "probe", "after"),
    [
        # consecutive failures cool it down after max_fails
        (Health(), FAIL, False, Health(fails=1, last_error="HTTP 503")),
        (Health(fails=1), FAIL, False, Health(fails=2, last_error="HTTP 503")),
        (Health(fails=2), FAIL, False, Health("cooling", NOW + 30, cooldowns=1, last_error="HTTP 503")),
        # a success in between starts the count again
        (Health(fails=2, last_error="x"), OK, False, Health(last_error="x")),
        # a failed probe doubles the cooldown, up to 10 minutes
        (Health("cooling", NOW, cooldowns=1, probing=True), FAIL, True,
         Health("cooling", NOW + 60, cooldowns=2, last_error="HTTP 503")),
        (Health("cooling", NOW, cooldowns=5, probing=True), FAIL, True,
         Health("cooling", NOW + 600, cooldowns=6, last_error="HTTP 503")),
        (Health("cooling", NOW, cooldowns=9, probing=True), FAIL, True,
         Health("cooling", NOW + 600, cooldowns=10, last_error="HTTP 503")),
        # a successful probe: healthy, the doubling forgotten
        (Health("cooling", NOW, cooldowns=4, probing=True, last_error="HTTP 503"), OK, True,
         Health(last_error="HTTP 503")),
        # Retry-After: cooling for exactly that long, at once
        (Health(), Verdict("rate_limited", "HTTP 429", retry_after=12), False,
         Health("cooling", NOW + 12, last_error="HTTP 429")),
        (Health(), Verdict("rate_limited", "HTTP 429", retry_after=1e12), False,
         Health("cooling", NOW + 86_400, last_error="HTTP 429")),
        # a 429 without Retry-After is one failure among others
        (Health(), Verdict("rate_limited", "HTTP 429"), False, Health(fails=1, last_error="HTTP 429")),
        # 402: disabled until quota_retry_s; 401: until a reload
        (Health(), Verdict("quota", "HTTP 402"), False,
         Health("disabled", NOW + 3600, last_error="HTTP 402")),
        (Health(), Verdict("auth", "HTTP 401"), False, Health("disabled", None, last_error="HTTP 401")),
        # the probe after quota_retry_s finds it still without quota
        (Health("disabled", NOW, probing=True), Verdict("quota", "HTTP 402"), True,
         Health("disabled", NOW + 3600, last_error="HTTP 402")),
        # answers to requests sent before it cooled change nothing but last_error
        (Health("cooling", NOW + 5, cooldowns=1), FAIL, False,
         Health("cooling", NOW + 5, cooldowns=1, last_error="HTTP 503")),
        (Health("cooling", NOW + 5, cooldowns=1), OK, False, Health("cooling", NOW + 5, cooldowns=1)),
        (Health("disabled", None), OK, False, Health("disabled", None)),
        # a request's own fault says nothing bad about the upstream
        (Health(fails=2), Verdict("ok"), False, Health()),
    ],
)  # fmt: skip
def test_observe(before: Health, verdict: Verdict, probe: bool, after: Health) -> None:
    assert observe(before, verdict, NOW, POLICY, probe=probe) == after


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        (Health(), True),
        (Health(fails=2), True),
        (Health("cooling", NOW + 1), False),
        (Health("cooling", NOW), True),  # its time is up: one request may probe it
        (Health("cooling", NOW - 5, probing=True), False),  # somebody probes it
        (Health("disabled", NOW + 1), False),
        (Health("disabled", NOW - 1), True),
        (Health("disabled", None), False),  # 401: never, until a reload
    ],
)
def test_available(health: Health, expected: bool) -> None:
    assert available(health, NOW) is expected


def test_take_marks_the_one_probe_and_abandoning_it_frees_it() -> None:
    assert take(Health(), NOW) == (Health(), False)
    probing, probe = take(Health("cooling", NOW - 1), NOW)
    assert probe and probing.probing and not available(probing, NOW)
    assert available(abandoned(probing), NOW)
    with pytest.raises(ValueError, match="not available"):
        take(probing, NOW)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (Health("disabled", None, last_error="HTTP 401"), Health(last_error="HTTP 401")),
        (Health("disabled", NOW + 99), Health()),
        (Health("cooling", NOW + 9, cooldowns=2), Health("cooling", NOW + 9, cooldowns=2)),
        (Health(fails=1), Health(fails=1)),
    ],
)
def test_a_reload_tries_disabled_upstreams_again(before: Health, after: Health) -> None:
    assert reloaded(before) == after


def test_retry_after_is_the_soonest_end() -> None:
    healths = [Health("cooling", NOW + 40), Health("disabled", NOW + 7.2), Health("disabled")]
    assert retry_after(healths, NOW, 30) == pytest.approx(7.2)
    assert retry_after([Health("disabled")], NOW, 30) == 30
    assert retry_after([Health("cooling", NOW - 3)], NOW, 30) == 1

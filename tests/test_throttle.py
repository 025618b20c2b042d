"""The console's sign-in throttle (gateway/http/console/throttle.py), on a fake clock."""

from __future__ import annotations

from gateway.http.console.throttle import SignInThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_failures_space_an_address_out_and_parallel_guesses_queue() -> None:
    clock = Clock()
    throttle = SignInThrottle(clock, first_s=1.0, max_s=4.0, max_wait_s=10.0)
    assert throttle.turn("10.0.0.1") == 0.0  # never failed: at once
    throttle.failed("10.0.0.1")
    # Three guesses arriving together wait 1, 2 and 3 s: each takes the next turn.
    assert [throttle.turn("10.0.0.1") for _ in range(3)] == [1.0, 2.0, 3.0]
    for _ in range(3):
        throttle.failed("10.0.0.1")  # now 4 failures: 4 s apart (the cap)
    waits = [throttle.turn("10.0.0.1") for _ in range(3)]
    assert waits[1] - waits[0] == 4.0
    assert throttle.turn("10.0.0.1") is None  # over 10 s of queue: refused at once
    assert throttle.turn("10.0.0.2") == 0.0  # nobody else waits
    throttle.succeeded("10.0.0.1")
    assert throttle.turn("10.0.0.1") == 0.0


def test_the_table_is_bounded_and_forgets() -> None:
    clock = Clock()
    throttle = SignInThrottle(clock, capacity=3, forget_s=60.0)
    for n in range(5):
        throttle.failed(f"10.0.0.{n}")
    assert len(throttle) == 3  # the least recently failed went first
    assert throttle.turn("10.0.0.0") == 0.0
    assert throttle.turn("10.0.0.4") != 0.0
    clock.now += 61
    assert throttle.turn("10.0.0.4") == 0.0


def test_an_ipv6_client_is_its_slash_64() -> None:
    throttle = SignInThrottle(Clock())
    throttle.failed("2001:db8:1:2::1")
    assert throttle.turn("2001:db8:1:2:ffff::9") != 0.0
    assert throttle.turn("2001:db8:1:3::1") == 0.0
    throttle.failed("::ffff:10.0.0.9")  # IPv4 mapped: the IPv4 address
    assert throttle.turn("10.0.0.9") != 0.0

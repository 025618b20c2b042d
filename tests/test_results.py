"""The result store (issue 25), in process on both engines: images kept once, served from the
store, deleted by their team or by retention, the opt-in cache, and a store that fails."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.http.keys import CONFIG, METRICS, RESULTS, REUSE
from gateway.store.base import LedgerQuery
from tests.conftest import PNG, TEAM_KEYS, Gateway, Upstream, books_balance
from tests.console import ConsoleUser
from tests.fakes import json_error

PROXY = {"upstream": {"proxy_results": True}}
FILES = "/v1/images/files/"


async def generate(
    gateway: Gateway, team: str = "design", headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers=gateway.headers(team, **(headers or {})),
            json={"prompt": "a lighthouse", **body},
        ) as resp:
            return resp.status, await resp.json(), dict(resp.headers)


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers or {}) as resp:
            return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


async def delete(gateway: Gateway, request_id: str, team: str = "design") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.delete(
            f"{gateway.url}/v1/images/results/{request_id}", headers=gateway.headers(team)
        ) as resp:
            return resp.status, await resp.json()


async def ledger_id(gateway: Gateway) -> str:
    """The ledger id of the last generation."""
    lines = [line for line in await gateway.log_lines() if line["endpoint"] == "generations"]
    return str(lines[-1]["ledger_id"])


def file_fetches(upstream: Upstream) -> int:
    return sum(1 for r in upstream.sim.received if r.path.startswith(FILES))


def stored_files(gateway: Gateway) -> list[Path]:
    root = gateway.settings.results.directory
    assert root is not None
    return [p for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp"]


async def kept(gateway: Gateway) -> None:
    await gateway.settled()
    await gateway.app[RESULTS].idle()


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    value = gateway.app[METRICS].registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_paid_image_is_stored_once_and_answers_every_b64_replay(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway()
    headers = {"Idempotency-Key": "one-image"}
    status, first, _ = await generate(gateway, headers=headers, response_format="b64_json")
    assert status == 200
    await kept(gateway)
    fetched = file_fetches(upstream)
    assert fetched == 1  # the answer's own download was kept, not fetched again
    (path,) = stored_files(gateway)
    data = base64.b64decode(first["data"][0]["b64_json"])
    assert path.name == hashlib.sha256(data).hexdigest() and path.read_bytes() == data
    for _ in range(2):  # Idempotency-Key replays read the store
        status, again, replay = await generate(gateway, headers=headers, response_format="b64_json")
        assert status == 200 and replay["Idempotent-Replayed"] == "true"
        assert again["data"][0]["b64_json"] == first["data"][0]["b64_json"]
    assert file_fetches(upstream) == fetched
    assert metric(gateway, "gateway_results_images") == 1
    assert metric(gateway, "gateway_results_bytes") == len(data)
    await books_balance(gateway, upstream)


async def test_an_sdk_retry_replay_reads_the_store(start_gateway: Any, upstream: Upstream) -> None:
    gateway = await start_gateway()
    status, first, _ = await generate(gateway, response_format="b64_json", n=2)
    assert status == 200
    await kept(gateway)
    fetched = file_fetches(upstream)
    retry = {"x-stainless-retry-count": "1"}
    status, again, headers = await generate(gateway, headers=retry, response_format="b64_json", n=2)
    assert status == 200 and "X-Gateway-Deduplicated" in headers
    assert [d["b64_json"] for d in again["data"]] == [d["b64_json"] for d in first["data"]]
    assert file_fetches(upstream) == fetched
    await books_balance(gateway, upstream)


async def test_proxy_results_are_served_from_the_store(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway(**PROXY)
    status, answer, _ = await generate(gateway)
    assert status == 200
    await kept(gateway)
    fetched = file_fetches(upstream)
    url = answer["data"][0]["url"]
    assert url.startswith(gateway.url + FILES)
    status, body, kind = await get(url)
    assert status == 200 and kind == "image/png"
    (path,) = stored_files(gateway)
    assert body == path.read_bytes()
    assert file_fetches(upstream) == fetched
    await books_balance(gateway, upstream)


async def test_a_mistyped_result_path_is_never_logged_whole(
    start_gateway: Any, upstream: Upstream
) -> None:
    """A result path is a credential wherever it is sent: a wrong method, a typo in the route,
    an odd spelling of the right one."""
    gateway = await start_gateway(**PROXY)
    _, answer, _ = await generate(gateway)
    path = answer["data"][0]["url"][len(gateway.url) :]
    name = path.rsplit("/", 1)[-1]
    tried = [
        ("POST", path),
        ("PUT", path),
        ("GET", path.replace("/v1/images/files/", "/v1/images/file/")),
        ("GET", path.replace("/v1/images/files/", "/v1/imges/files/")),
        ("GET", "/v1/images/files/" + name + "%2e"),
    ]
    async with aiohttp.ClientSession() as http:
        for method, odd in tried:
            async with http.request(method, gateway.url + odd) as resp:
                assert resp.status in (404, 405), (method, odd)  # the route is exact
    lines = [line for line in await gateway.log_lines() if line["endpoint"] != "generations"]
    assert len(lines) == len(tried)
    secret = name.rsplit("-", 1)[0]  # the upstream id in it; its first 8 characters may show
    assert [line["path"] for line in lines if secret in json.dumps(line)] == []
    await books_balance(gateway, upstream)


async def test_the_owner_deletes_a_result_and_the_ledger_keeps_it(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway(**PROXY)
    status, answer, _ = await generate(gateway, n=2)
    assert status == 200
    await kept(gateway)
    request_id = await ledger_id(gateway)
    assert len(stored_files(gateway)) == 2
    assert (await delete(gateway, request_id, team="ops"))[0] == 404
    assert (await delete(gateway, "req_unknown"))[0] == 404
    status, body = await delete(gateway, request_id)
    assert status == 200 and body == {
        "object": "result.deleted",
        "request_id": request_id,
        "deleted": 2,
    }
    assert stored_files(gateway) == []
    for item in answer["data"]:
        status, body, _ = await get(item["url"])
        assert status == 410, body
    status, body = await delete(gateway, request_id)
    assert status == 410 and body["error"]["code"] == "result_expired"
    (entry,) = await gateway.db.entries(LedgerQuery())
    assert entry.state == "captured" and entry.images == 2
    assert metric(gateway, "gateway_results_images") == 0
    await books_balance(gateway, upstream)


async def test_a_deletion_on_a_disk_that_refuses_it_still_answers_and_says_so(
    start_gateway: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway(**PROXY)
    status, answer, _ = await generate(gateway)
    await kept(gateway)
    request_id = await ledger_id(gateway)
    (stored,) = stored_files(gateway)
    stored.unlink()
    stored.mkdir()  # its removal now fails, as on a read-only disk (even as root)
    with caplog.at_level(logging.WARNING, logger="gateway.results"):
        status, body = await delete(gateway, request_id)
    assert status == 200 and body["deleted"] == 1
    assert (await get(answer["data"][0]["url"]))[0] == 410
    assert "could not be removed" in caplog.text
    await books_balance(gateway, upstream)


async def test_a_deletion_before_the_fetch_ends_keeps_nothing(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway(**PROXY)
    release = asyncio.Event()

    async def slow_file(request: Any, handler: Any) -> Any:  # holds the background fetch
        if request.path.startswith(FILES):
            await release.wait()
        return await handler(request)

    upstream.faults.add(slow_file, kind="GET")
    status, _, _ = await generate(gateway)
    assert status == 200
    await gateway.settled()
    request_id = await ledger_id(gateway)
    assert (await delete(gateway, request_id))[0] == 200
    release.set()
    await kept(gateway)
    assert stored_files(gateway) == []
    await books_balance(gateway, upstream)


@pytest.mark.postgres_only
async def test_an_instance_removes_its_copies_of_images_deleted_elsewhere(
    start_gateway: Any, upstream: Upstream, tmp_path: Path
) -> None:
    first = await start_gateway(results={"directory": str(tmp_path / "a")}, **PROXY)
    second = await start_gateway(results={"directory": str(tmp_path / "b")}, **PROXY)
    _, answer, headers = await generate(first)
    await kept(first)
    url = answer["data"][0]["url"].replace(first.url, second.url)
    assert (await get(url))[0] == 200  # the second keeps a copy of its own
    assert len(stored_files(second)) == 1
    assert (await delete(first, headers["X-Request-ID"]))[0] == 200
    assert stored_files(first) == [] and len(stored_files(second)) == 1
    await second.app[RESULTS].sweep()
    assert stored_files(second) == []
    assert (await get(url))[0] == 410
    await books_balance(first, upstream)


async def test_images_a_stop_left_unstored_are_fetched_at_the_next_start(
    start_gateway: Any, upstream: Upstream
) -> None:
    """Stopped (or killed) while its file host was slow: the image is indexed, never stored.
    The next start fetches it, so a reuse request is a hit rather than a second purchase."""
    hold, arrived = asyncio.Event(), asyncio.Event()

    async def slow_file(request: Any, handler: Any) -> Any:
        arrived.set()
        await hold.wait()
        return await handler(request)

    upstream.faults.add(slow_file, kind="GET")
    reuse = {"X-Gateway-Cache": "reuse"}
    gateway = await start_gateway(**PROXY)
    status, first, _ = await generate(gateway, headers=reuse)
    assert status == 200
    await arrived.wait()
    await gateway.settled()
    await gateway.server.close()  # its fetch is cancelled with it
    hold.set()
    again = await start_gateway(**PROXY)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while metric(again, "gateway_results_images") < 1:
        assert loop.time() < deadline, "the image was never fetched again"
        await asyncio.sleep(0.01)
    assert len(stored_files(again)) == 1
    status, second, headers = await generate(again, headers=reuse)
    assert (status, headers["X-Gateway-Cache-Status"]) == (200, "hit")
    paths = [[item["url"].split(FILES)[1] for item in a["data"]] for a in (first, second)]
    assert paths[0] == paths[1]  # the same image (through another gateway's address)
    assert len(upstream.sim.generation_requests()) == 1
    await books_balance(again, upstream)


async def test_keep_days_and_max_gb_evict_with_the_clock(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway(
        results={"keep_days": 3}, teams={"ops": {"keep_days": 1}}, **PROXY
    )
    _, ops_answer, _ = await generate(gateway, team="ops", prompt="ops image")
    _, design_answer, _ = await generate(gateway, prompt="design image")
    await kept(gateway)
    assert len(stored_files(gateway)) == 2
    gateway.clock.advance(days=2)
    assert await gateway.app[RESULTS].sweep() == 1  # ops keeps 1 day, design 3
    assert (await get(ops_answer["data"][0]["url"]))[0] == 410
    assert (await get(design_answer["data"][0]["url"]))[0] == 200
    gateway.clock.advance(days=1, seconds=1)
    assert await gateway.app[RESULTS].sweep() == 1
    assert (await get(design_answer["data"][0]["url"]))[0] == 410
    assert stored_files(gateway) == []
    await books_balance(gateway, upstream)


async def test_beyond_max_gb_the_oldest_go_first(start_gateway: Any, upstream: Upstream) -> None:
    gateway = await start_gateway(**PROXY)
    answers = []
    for prompt in ("first", "second", "third"):
        answers.append((await generate(gateway, prompt=prompt))[1])
        gateway.clock.advance(seconds=10)
    await kept(gateway)
    files = stored_files(gateway)
    assert len(files) == 3
    room = sum(p.stat().st_size for p in files) - 1  # one byte too many
    gateway.app[CONFIG].reload(
        replace(gateway.settings, results=replace(gateway.settings.results, max_bytes=room))
    )  # as a SIGHUP would
    assert await gateway.app[RESULTS].sweep() == 1
    assert (await get(answers[0]["data"][0]["url"]))[0] == 410
    assert [(await get(a["data"][0]["url"]))[0] for a in answers[1:]] == [200, 200]
    assert 0 < metric(gateway, "gateway_results_bytes") <= room
    assert len(stored_files(gateway)) == 2
    await books_balance(gateway, upstream)


async def test_reuse_answers_an_identical_request_for_nothing(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway()
    reuse = {"X-Gateway-Cache": "reuse"}
    status, first, headers = await generate(gateway, headers=reuse)
    assert status == 200 and headers["X-Gateway-Cache-Status"] == "miss"
    await kept(gateway)
    status, second, headers = await generate(gateway, headers=reuse)
    assert status == 200 and headers["X-Gateway-Cache-Status"] == "hit"
    assert second["data"] == first["data"]
    assert len(upstream.sim.generation_requests()) == 1
    lines = [line for line in await gateway.log_lines() if line["endpoint"] == "generations"]
    assert [(line["cache"], line["cost_cny"]) for line in lines] == [("miss", 0.2), ("hit", 0.0)]
    assert lines[1]["ledger_id"] is None and lines[1]["reserved_cny"] == 0.0
    assert metric(gateway, "gateway_cache_saved_cny_total", team="design") == pytest.approx(0.2)
    status, _, headers = await generate(gateway)  # without the opt-in: a new image
    assert status == 200 and "X-Gateway-Cache-Status" not in headers
    assert len(upstream.sim.generation_requests()) == 2
    await books_balance(gateway, upstream)


async def test_reuse_is_per_team_and_per_reference_image(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway(teams={"ops": {"reuse_identical_s": 600}})
    red = "data:image/png;base64," + base64.b64encode(PNG).decode()
    other = "data:image/png;base64," + base64.b64encode(PNG + b"\x00").decode()
    reuse = {"X-Gateway-Cache": "reuse"}
    assert (await generate(gateway, headers=reuse, image_urls=[red]))[2][
        "X-Gateway-Cache-Status"
    ] == "miss"
    await kept(gateway)
    _, _, headers = await generate(gateway, headers=reuse, image_urls=[other])
    assert headers["X-Gateway-Cache-Status"] == "miss"  # same prompt, another reference
    _, _, headers = await generate(gateway, team="ops", image_urls=[red])  # team setting
    assert headers["X-Gateway-Cache-Status"] == "miss"  # another team's result is not its own
    await kept(gateway)
    _, _, headers = await generate(gateway, team="ops", image_urls=[red])
    assert headers["X-Gateway-Cache-Status"] == "hit"
    _, _, headers = await generate(
        gateway, team="ops", headers={"X-Gateway-Cache": "bypass"}, image_urls=[red]
    )
    assert headers["X-Gateway-Cache-Status"] == "bypass"
    assert len(upstream.sim.generation_requests()) == 4
    status, body, _ = await generate(gateway, headers={"X-Gateway-Cache": "maybe"})
    assert status == 400 and body["error"]["param"] == "X-Gateway-Cache"
    await books_balance(gateway, upstream)


async def test_reuse_outside_its_window_is_a_miss(start_gateway: Any, upstream: Upstream) -> None:
    gateway = await start_gateway(teams={"design": {"reuse_identical_s": 60}})
    await generate(gateway)
    await kept(gateway)
    gateway.clock.advance(seconds=61)
    _, _, headers = await generate(gateway)
    assert headers["X-Gateway-Cache-Status"] == "miss"
    await books_balance(gateway, upstream)


async def test_twenty_identical_reuse_requests_in_flight_buy_one_image(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway()
    answers = await asyncio.gather(
        *(generate(gateway, headers={"X-Gateway-Cache": "reuse"}) for _ in range(20))
    )
    assert [status for status, _, _ in answers] == [200] * 20
    statuses = sorted(headers["X-Gateway-Cache-Status"] for _, _, headers in answers)
    assert statuses == ["hit"] * 19 + ["miss"]
    assert len({answer["data"][0]["url"] for _, answer, _ in answers}) == 1
    assert len(upstream.sim.generation_requests()) == 1
    entries = await gateway.db.entries(LedgerQuery())
    assert [(e.state, e.charged) for e in entries] == [("captured", 2000)]
    await books_balance(gateway, upstream)


async def test_identical_reuse_requests_share_the_first_one_s_failure_and_never_send_again(
    start_gateway: Any, upstream: Upstream
) -> None:
    """The first of 20 identical ``reuse`` requests fails upstream: the others get its failure,
    and nothing more is sent (one of them sending again after another would turn a burst into
    a queue of possibly billed sends)."""
    gateway = await start_gateway()
    release, arrived = asyncio.Event(), asyncio.Event()

    async def refused_once_released(request: Any, handler: Any) -> Any:
        arrived.set()
        await release.wait()
        return await json_error(400, "invalid_request_error", "moderation")(request, handler)

    upstream.faults.add(refused_once_released)
    reuse = {"X-Gateway-Cache": "reuse"}
    first = asyncio.ensure_future(generate(gateway, headers=reuse))
    await arrived.wait()  # the first is at the upstream: the others will wait on it
    others = [asyncio.ensure_future(generate(gateway, headers=reuse)) for _ in range(19)]
    await until_waiting(gateway, 19)
    release.set()
    answers = await asyncio.gather(first, *others)
    assert [status for status, _, _ in answers] == [400] * 20
    assert {answer["error"]["message"] for _, answer, _ in answers} == {
        answers[0][1]["error"]["message"]
    }
    assert upstream.faults.seen == 1
    entries = await gateway.db.entries(LedgerQuery())
    assert [(e.state, e.charged) for e in entries] == [("released", 0)]
    await books_balance(gateway, upstream)


async def until_waiting(gateway: Gateway, count: int) -> None:
    """Until ``count`` requests wait on an identical one in flight (polled, with a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    reuse = gateway.app[REUSE]
    while sum(len(f._callbacks or ()) for f in reuse._in_flight.values()) < count:
        assert loop.time() < deadline, "the identical requests never waited"
        await asyncio.sleep(0.005)


async def test_identical_reuse_requests_do_not_wait_for_unrelated_downloads(
    start_gateway: Any, upstream: Upstream
) -> None:
    """Every background download slot is taken by other results whose file host hangs: an
    identical request is answered as soon as the first one's money is settled."""
    gateway = await start_gateway()
    hold = asyncio.Event()

    async def slow_file(request: Any, handler: Any) -> Any:
        await hold.wait()
        return await handler(request)

    for _ in range(4):  # four other results take every background slot
        upstream.faults.add(slow_file, kind="GET")
    for i in range(4):
        assert (await generate(gateway, prompt=f"other {i}", response_format="url"))[0] == 200
    reuse = {"X-Gateway-Cache": "reuse"}
    first = await generate(gateway, headers=reuse, response_format="url")
    second = await asyncio.wait_for(generate(gateway, headers=reuse, response_format="url"), 60)
    assert [first[0], second[0]] == [200, 200]
    assert first[2]["X-Gateway-Cache-Status"] == "miss"
    assert second[1]["data"] == first[1]["data"]
    hold.set()
    await kept(gateway)
    assert len(upstream.sim.generation_requests()) == 5
    await books_balance(gateway, upstream)


async def test_an_unwritable_store_never_fails_a_paid_request(
    start_gateway: Any, upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the store should be")
    gateway = await start_gateway(results={"directory": str(blocked)}, **PROXY)
    with caplog.at_level(logging.WARNING, logger="gateway.results"):
        status, answer, _ = await generate(gateway, response_format="b64_json")
        assert status == 200 and base64.b64decode(answer["data"][0]["b64_json"])[:4] == PNG[:4]
        status, answer, _ = await generate(gateway, prompt="by url")
        assert status == 200
        await kept(gateway)
        status, body, _ = await get(answer["data"][0]["url"])  # streamed as before
        assert status == 200 and body[:4] == PNG[:4]
    assert "cannot be written" in caplog.text
    assert metric(gateway, "gateway_results_fetch_failures_total", reason="disk") >= 2
    await books_balance(gateway, upstream)


async def test_a_corrupt_stored_file_is_fetched_again(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway(**PROXY)
    status, answer, _ = await generate(gateway)
    await kept(gateway)
    (path,) = stored_files(gateway)
    good = path.read_bytes()
    path.write_bytes(good[:-8] + b"rotten!!")
    fetched = file_fetches(upstream)
    status, body, _ = await get(answer["data"][0]["url"])
    assert status == 200 and body == good
    assert path.read_bytes() == good
    assert file_fetches(upstream) == fetched + 1
    path.write_bytes(b"")  # truncated: the b64_json reader finds it too
    status, again, _ = await generate(
        gateway, headers={"x-stainless-retry-count": "1"}, response_format="b64_json"
    )
    assert status == 200 and base64.b64decode(again["data"][0]["b64_json"]) == good
    assert file_fetches(upstream) == fetched + 2
    await books_balance(gateway, upstream)


async def test_the_store_can_be_off(start_gateway: Any, upstream: Upstream) -> None:
    gateway = await start_gateway(results={"store": "off"}, **PROXY)
    status, answer, headers = await generate(gateway, headers={"X-Gateway-Cache": "reuse"})
    assert status == 200 and headers["X-Gateway-Cache-Status"] == "bypass"
    await kept(gateway)
    assert not (gateway.settings.results.directory or Path("/nonexistent")).exists()
    assert (await get(answer["data"][0]["url"]))[0] == 200  # streamed from the upstream
    request_id = await ledger_id(gateway)
    assert (await delete(gateway, request_id))[0] == 200
    assert (await get(answer["data"][0]["url"]))[0] == 410
    await books_balance(gateway, upstream)


async def test_the_console_shows_images_from_the_store(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway()
    assert (await generate(gateway))[0] == 200
    request_id = await ledger_id(gateway)
    await kept(gateway)
    (path,) = stored_files(gateway)
    fetched = file_fetches(upstream)
    async with ConsoleUser(gateway) as user:
        await user.sign_in(TEAM_KEYS["design"])
        async with user.http.get(f"{gateway.url}/console/images/{request_id}/0") as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
            assert await resp.read() == path.read_bytes()
        assert file_fetches(upstream) == fetched
        assert (await delete(gateway, request_id))[0] == 200
        assert (await user.get(f"/console/images/{request_id}/0"))[0] == 404
    await books_balance(gateway, upstream)


async def test_identical_reuse_requests_share_one_generation_when_nothing_can_be_stored(
    start_gateway: Any, upstream: Upstream, tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("in the way")
    gateway = await start_gateway(results={"directory": str(blocked)})
    answers = await asyncio.gather(
        *(generate(gateway, headers={"X-Gateway-Cache": "reuse"}) for _ in range(5))
    )
    assert [status for status, _, _ in answers] == [200] * 5
    assert sorted(h["X-Gateway-Cache-Status"] for _, _, h in answers) == ["hit"] * 4 + ["miss"]
    assert len(upstream.sim.generation_requests()) == 1
    await books_balance(gateway, upstream)


async def test_a_failing_file_host_is_tried_again_then_given_up_on(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway(**PROXY)
    upstream.faults.add(json_error(503, "server_error", "busy"), kind="GET")
    await generate(gateway, prompt="second try")
    await kept(gateway)
    assert len(stored_files(gateway)) == 1 and file_fetches(upstream) == 1  # + the failed one
    assert metric(gateway, "gateway_results_fetch_failures_total", reason="fetch") == 0
    for _ in range(3):
        upstream.faults.add(json_error(503, "server_error", "busy"), kind="GET")
    _, answer, _ = await generate(gateway, prompt="never")
    await kept(gateway)
    assert metric(gateway, "gateway_results_fetch_failures_total", reason="fetch") == 1
    assert len(stored_files(gateway)) == 1
    status, _, _ = await get(answer["data"][0]["url"])  # the host is back: fetched and kept
    assert status == 200 and len(stored_files(gateway)) == 2
    await books_balance(gateway, upstream)

"""Issue 20: modern clients as they are, and a team that can see its own budget.

The ``auto`` response format, today's OpenAI model names, sizes no ratio is near, the team's
``GET /v1/gateway/usage`` and ``X-Gateway-Budget-Remaining`` (agreeing with ``usage --json``),
every image of an async ``n > 1`` task, the 401 for an OpenAI key, one status for an oversized
image however it is sent. (The Vercel AI SDK itself runs in ``test_vercel_ai_sdk.py``.)
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from decimal import Decimal
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from gateway.core.auth import key_digest
from gateway.core.normalize import RATIOS
from gateway.http.keys import RESULTS
from gateway.store.base import LedgerQuery
from gateway.upstream.pngs import solid_png
from tests.client import post
from tests.conftest import NAMED_KEYS, TEAM_KEYS, Gateway, Upstream, books_balance
from tests.fakes import respond

AI_SDK_AGENT = "ai/6.0.333 ai-sdk/openai/3.0.141 ai-sdk/provider-utils/4.0.66 runtime/node.js/v20"
BUDGET_HEADER = "X-Gateway-Budget-Remaining"


async def get(
    gateway: Gateway, path: str, key: str = TEAM_KEYS["design"]
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + path, headers={"Authorization": f"Bearer {key}"}) as resp:
            return resp.status, await resp.json(), resp.headers


async def image_at(url: str) -> bytes:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        return await resp.read()


# -- response format --------------------------------------------------------------------------


async def test_the_openai_sdk_gets_url_and_b64_json_from_a_default_config(
    gateway: Gateway, upstream: Upstream
) -> None:
    result = await gateway.async_openai().images.generate(model="gpt-image-1", prompt="x", n=2)
    assert len(result.data) == 2
    for item in result.data:
        assert item.url is not None and item.url.startswith(upstream.url)
        assert base64.b64decode(item.b64_json) == await image_at(item.url)
    assert "response_format" not in upstream.sim.generation_requests()[0].body
    await books_balance(gateway, upstream)


async def test_curl_with_the_upstreams_shapes_gets_url_only(
    gateway: Gateway, upstream: Upstream
) -> None:
    for body in ({"model": "gpt-image-2", "size": "16:9", "resolution": "2k"}, {}):
        status, answer, headers = await post(gateway, **body, headers={"User-Agent": "curl/8.5.0"})
        assert status == 200
        assert [set(item) for item in answer["data"]] == [{"url"}]
        assert "X-Gateway-Warning" not in headers
    await gateway.app[RESULTS].idle()
    downloads = [r for r in upstream.sim.received if "/files/" in r.path]
    assert len(downloads) == 2  # each image once, by the result store, none for the answers
    await books_balance(gateway, upstream)


async def test_the_ai_sdk_user_agent_gets_both(gateway: Gateway, upstream: Upstream) -> None:
    status, answer, _ = await post(
        gateway, model="gpt-image-2", n=1, headers={"User-Agent": AI_SDK_AGENT}
    )
    assert status == 200
    (item,) = answer["data"]
    assert base64.b64decode(item["b64_json"]) == await image_at(item["url"])


async def test_a_failed_download_in_auto_is_url_only_with_a_warning_never_an_error(
    gateway: Gateway, upstream: Upstream
) -> None:
    foreign = "http://localhost:9/v1/images/files/gpt-image-2/20261126/x-1.png"  # not upstream's
    upstream.faults.add(respond({"created": 1, "id": "u1", "data": [{"url": foreign}]}))
    status, answer, headers = await post(
        gateway, model="gpt-image-1", headers={"x-stainless-lang": "python"}
    )
    assert status == 200  # the image was paid for
    assert answer["data"] == [{"url": foreign}]
    assert "b64_json unavailable" in headers["X-Gateway-Warning"]
    assert BUDGET_HEADER in headers


# -- model names and sizes --------------------------------------------------------------------


async def test_current_model_names_pass_and_impossible_sizes_cost_nothing(
    gateway: Gateway, upstream: Upstream
) -> None:
    for model in (
        "gpt-image-2-2026-04-21",
        "gpt-image-2.5-flare-2026-09-08",
        "chatgpt-image-latest",
    ):
        status, _, _ = await post(gateway, model=model, headers={"User-Agent": "curl/8"})
        assert status == 200
    assert {r.body["model"] for r in upstream.sim.generation_requests()} == {"gpt-image-2"}
    for size in ("999x1", "1x999", "10000x10"):
        status, answer, _ = await post(gateway, size=size)
        assert status == 400
        assert (answer["error"]["code"], answer["error"]["param"]) == ("invalid_size", "size")
        assert ", ".join(RATIOS) in answer["error"]["message"]
    assert len(upstream.sim.generation_requests()) == 3  # the refusals never left
    assert len(await gateway.db.entries(LedgerQuery())) == 3  # and reserved nothing
    for size, ratio in (("1536x1024", "3:2"), ("1792x1024", "16:9"), ("1024x1792", "9:16")):
        assert (await post(gateway, size=size))[0] == 200
        assert upstream.sim.generation_requests()[-1].body["size"] == ratio
    await books_balance(gateway, upstream)


# -- the team's own budget --------------------------------------------------------------------


def named(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "sha256": key_digest(NAMED_KEYS[name]), **extra}


def remaining(headers: CIMultiDictProxy[str]) -> Decimal:
    text = headers[BUDGET_HEADER]
    assert Decimal(text).as_tuple().exponent == -4, text  # an exact decimal string
    return Decimal(text)


async def usage_json(gateway: Gateway, tmp_path: Any, *args: str) -> dict[str, Any]:
    config = gateway.config_file(tmp_path / "gateway.toml")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "usage", "--config", str(config), "--json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=gateway.cli_env(),
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return dict(json.loads(out)["teams"]["design"])


async def test_route_header_and_usage_report_agree_after_a_mixed_run(
    start_gateway, upstream: Upstream, tmp_path: Any
) -> None:
    gateway = await start_gateway(
        teams={
            "design": {
                "budget_cny": "1.00",
                "period": "total",  # the CLI's clock is the real one; a total period is both's
                "keys": [named("web-app", budget_cny="0.50"), named("batch")],
            }
        }
    )
    web, batch = NAMED_KEYS["web-app"], NAMED_KEYS["batch"]
    status, _, headers = await post(gateway, key=web)  # sync, 0.20
    assert status == 200 and remaining(headers) == Decimal("0.8")
    status, task, headers = await post(gateway, n=2, key=batch, suffix="?async=1")  # 0.40
    assert status == 202 and remaining(headers) == Decimal("0.4")
    upstream.sim.finish_task(task["task_id"])
    assert (await get(gateway, f"/v1/images/tasks/{task['task_id']}", batch))[0] == 200
    status, answer, headers = await post(gateway, n=2, key=web)  # over the key's cap
    assert status == 402 and answer["error"]["code"] == "key_budget_exceeded"
    status, answer, _ = await post(gateway, n=3, key=batch)  # over the team's budget
    assert status == 402 and answer["error"]["code"] == "budget_exceeded"
    status, _, headers = await post(gateway, quality="low", key=batch)  # 0.10
    assert status == 200
    last = remaining(headers)
    await gateway.settled()

    status, capped, _ = await get(gateway, "/v1/gateway/usage", web)
    assert status == 200
    status, uncapped, _ = await get(gateway, "/v1/gateway/usage", batch)
    assert status == 200
    assert capped == {
        "team": "design",
        "key": "design/web-app",
        "period": "total",
        "budget_cny": 1.0,
        "spent_cny": 0.7,
        "reserved_cny": 0.0,
        "uncertain_cny": 0.0,
        "remaining_cny": 0.3,
        "resets_at": None,
        "key_budget_cny": 0.5,
        "key_remaining_cny": 0.3,
    }
    assert uncapped == {
        **capped,
        "key": "design/batch",
        "key_budget_cny": None,
        "key_remaining_cny": None,
    }
    report = await usage_json(gateway, tmp_path, "--by", "key")
    assert report["remaining_cny"] == capped["remaining_cny"] == float(last)
    for field in ("budget_cny", "spent_cny", "reserved_cny", "uncertain_cny"):
        assert report[field] == capped[field], field
    assert report["by"]["design/web-app"]["remaining_cny"] == capped["key_remaining_cny"]
    await books_balance(gateway, upstream)


async def test_a_key_sees_its_own_teams_current_period_only(gateway: Gateway) -> None:
    assert (await post(gateway, quality="high"))[0] == 200  # design spends; ops does not
    await gateway.settled()
    status, ops, _ = await get(gateway, "/v1/gateway/usage?team=design", TEAM_KEYS["ops"])
    assert status == 200
    assert (ops["team"], ops["spent_cny"], ops["remaining_cny"]) == ("ops", 0.0, 100.0)
    assert (ops["period"], ops["resets_at"]) == ("2026-11-26", "2026-11-27T00:00:00+00:00")
    assert ops["key"].startswith("ops/sha256:") and ops["key_budget_cny"] is None
    status, design, _ = await get(gateway, "/v1/gateway/usage")
    assert (design["period"], design["resets_at"]) == ("2026-11", "2026-12-01T00:00:00+00:00")
    assert design["spent_cny"] == 0.4
    status, answer, _ = await get(gateway, "/v1/gateway/usage", "igw_not_a_key_0000000000000")
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    lines = [line for line in await gateway.log_lines() if line["endpoint"] == "usage"]
    assert [line["team"] for line in lines] == ["ops", "design", None]


async def test_a_replayed_answer_carries_the_budget_as_it_stands(
    gateway: Gateway, upstream: Upstream
) -> None:
    headers = {"Idempotency-Key": "replay-me"}
    first = await post(gateway, headers=headers)
    assert remaining(first[2]) == Decimal("99.8")
    assert remaining((await post(gateway, prompt="another"))[2]) == Decimal("99.6")
    await gateway.settled()
    again = await post(gateway, headers=headers)
    assert again[2]["Idempotent-Replayed"] == "true"
    assert remaining(again[2]) == Decimal("99.6")  # the replay holds nothing: as it stands
    await books_balance(gateway, upstream)


# -- async n > 1 ------------------------------------------------------------------------------


async def test_an_async_task_of_two_images_shows_both(gateway: Gateway, upstream: Upstream) -> None:
    status, task, _ = await post(gateway, n=2, suffix="?async=1")
    assert status == 202
    upstream.sim.finish_task(task["task_id"])
    status, answer, _ = await get(gateway, f"/v1/images/tasks/{task['task_id']}")
    assert status == 200 and answer["cost"] == 0.4
    urls = [item["url"] for item in answer["data"]]
    assert len(set(urls)) == 2 and answer["result_url"] == urls[0]
    for url in urls:
        assert (await image_at(url)).startswith(b"\x89PNG")
    again = await get(gateway, f"/v1/images/tasks/{task['task_id']}")  # from the database
    assert again[1]["data"] == answer["data"]
    line = next(line for line in await gateway.log_lines() if line["mode"] == "poll")
    assert len(line["result_ids"]) == 2
    await books_balance(gateway, upstream)


async def test_a_task_answer_listing_result_urls_shows_each(
    gateway: Gateway, upstream: Upstream
) -> None:
    status, task, _ = await post(gateway, n=2, suffix="?async=1")
    urls = [f"{upstream.url}/v1/images/files/gpt-image-2/20261126/t-{i}.png" for i in (1, 2)]
    upstream.faults.add(
        respond(
            {
                "task_id": task["task_id"],
                "status": "completed",
                "cost": 0.4,
                "result_url": urls[0],
                "result_urls": urls,
            }
        ),
        kind="TASK",
    )
    status, answer, _ = await get(gateway, f"/v1/images/tasks/{task['task_id']}")
    assert status == 200
    assert answer["data"] == [{"url": url} for url in urls]


# -- errors -----------------------------------------------------------------------------------


async def test_an_openai_key_is_told_a_gateway_key_is_expected(gateway: Gateway) -> None:
    openai_key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
    status, answer, _ = await post(gateway, key=openai_key)
    assert status == 401
    message = answer["error"]["message"]
    assert "igw_" in message and "sk-" in message and openai_key not in message
    status, answer, _ = await post(gateway, key="igw_wrong_key_000000000000000000")
    assert status == 401 and "igw_" not in answer["error"]["message"]


async def test_a_30_mb_image_gets_413_as_a_file_and_as_a_data_url(
    gateway: Gateway, upstream: Upstream
) -> None:
    """One rule (``max_image_mb``, 20 by default), one status, however the image is sent."""
    image = solid_png(1, 1, (0, 0, 0)) + bytes(30 * 1024 * 1024)
    answers = []
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("prompt", "x")
        form.add_field("image", image, filename="big.png", content_type="image/png")
        async with http.post(
            gateway.url + "/v1/images/edits", headers=gateway.headers(), data=form
        ) as resp:
            answers.append((resp.status, await resp.json()))
        data_url = "data:image/png;base64," + base64.b64encode(image).decode()
        del image
        async with http.post(
            gateway.url + "/v1/images/edits",
            headers=gateway.headers(),
            json={"prompt": "x", "image_urls": [data_url]},
        ) as resp:
            answers.append((resp.status, await resp.json()))
    for status, answer in answers:
        assert status == 413 and answer["error"]["code"] == "payload_too_large", answer
        assert "larger than" in answer["error"]["message"]
    assert upstream.sim.generation_requests() == []


async def test_the_models_route_lists_the_new_names(gateway: Gateway) -> None:
    status, answer, _ = await get(gateway, "/v1/models")
    assert status == 200
    names = {item["id"] for item in answer["data"]}
    assert {"chatgpt-image-latest", "gpt-image-2.5-flare", "gpt-image-2.5-sunburst"} <= names

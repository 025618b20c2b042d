"""The web console over HTTP (issue 24): sessions, pages, forms, images, the JSON behind them.

The browser itself is in ``test_console_browser.py``; here each rule is checked on the wire.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.auth import key_digest
from gateway.core.periods import utc_now
from gateway.core.sessions import SESSION_S, seal, unseal
from gateway.http.console.state import CONSOLE, PAGES_AT_ONCE
from gateway.http.keys import CONFIG, DB
from gateway.store.base import LedgerQuery
from tests.conftest import (
    ADMIN_KEY,
    NAMED_KEYS,
    TEAM_KEYS,
    Gateway,
    Upstream,
    books_balance,
    build_settings,
)
from tests.console import TOKEN, ConsoleUser, cli
from tests.fakes import hang, lost_answer
from tests.process import GatewayProcess
from tests.test_rehearsal import BANNER_END

TEMPLATES = Path(__file__).resolve().parent.parent / "gateway" / "http" / "templates"


async def generate(gateway: Gateway, key: str = TEAM_KEYS["design"], **body: Any) -> str:
    """A generation; its ledger id."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers={"Authorization": f"Bearer {key}"},
            json={"prompt": "a kite", **body},
        ) as resp:
            await resp.read()
            return resp.headers["X-Request-ID"]


async def metric(gateway: Gateway, name: str) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            gateway.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            text = await resp.text()
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert found, name
    return float(found[1])


# -- what a team sees -------------------------------------------------------------------------


async def test_a_team_reads_what_usage_json_and_its_usage_route_say_to_the_fen(
    start_gateway: Any, upstream: Upstream, tmp_path: Path
) -> None:
    batch = {"name": "batch", "sha256": key_digest(NAMED_KEYS["batch"]), "budget_cny": "5.00"}
    gateway = await start_gateway(with_clock=utc_now, teams={"design": {"keys": [batch]}})
    await generate(gateway, quality="high", n=2)
    await generate(gateway, NAMED_KEYS["batch"], quality="low")
    await generate(gateway, TEAM_KEYS["ops"])
    await gateway.settled()
    async with ConsoleUser(gateway) as user:
        await user.sign_in(NAMED_KEYS["batch"])
        data = await user.json("/console/team.json")
        status, page, _ = await user.get("/console/team")
    assert status == 200
    code, out, err = await cli(gateway, tmp_path, "usage", "--team", "design", "--json")
    assert code == 0, err
    report = json.loads(out)["teams"]["design"]  # `usage --json` (on the CLI's own clock)
    for figure in ("budget_cny", "spent_cny", "reserved_cny", "uncertain_cny", "remaining_cny"):
        assert data["standing"][figure] == report[figure], figure
    assert data["standing"]["resets_at"] == report["period_end"]
    async with aiohttp.ClientSession() as http:
        async with http.get(
            gateway.url + "/v1/gateway/usage",
            headers={"Authorization": f"Bearer {NAMED_KEYS['batch']}"},
        ) as resp:
            assert data["standing"] == await resp.json()  # the team's own route, for its key
    assert data["standing"]["key_remaining_cny"] == 4.9
    code, out, err = await cli(gateway, tmp_path, "usage", "--team", "design", "--by", "key",
                               "--json")  # fmt: skip
    by_key = json.loads(out)["teams"]["design"]["by"]
    for key in data["keys"]:
        if key["key"] in by_key:
            assert key["spent_cny"] == by_key[key["key"]]["spent_cny"], key
            assert key["remaining_cny"] == by_key[key["key"]].get("remaining_cny"), key
    assert [r["images"] for r in data["requests"]] == [1, 2]  # its own requests only
    assert sum(data["spend_by_day"]["by_quality"]["high"].values()) == 0.8
    assert 'id="remaining">99.10<' in page and 'id="key-remaining">4.90 of 5.00' in page
    await books_balance(gateway, upstream)


async def test_a_team_sees_its_own_images_through_the_console(
    gateway: Gateway, upstream: Upstream
) -> None:
    mine = await generate(gateway, n=2, size="16:9")
    theirs = await generate(gateway, TEAM_KEYS["ops"])
    await gateway.settled()
    async with ConsoleUser(gateway) as user:
        await user.sign_in(TEAM_KEYS["design"])
        async with user.http.get(f"{gateway.url}/console/images/{mine}/1") as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
            assert (await resp.read()).startswith(b"\x89PNG\r\n\x1a\n")
            assert resp.headers["Cache-Control"] == "private, max-age=86400"
        for path, status in (
            (f"/console/images/{mine}/2", 404),  # two images: 0 and 1
            (f"/console/images/{mine}/x", 404),
            ("/console/images/req_nobody/0", 404),
            (f"/console/images/{theirs}/0", 403),
        ):
            assert (await user.get(path))[0] == status, path
    async with ConsoleUser(gateway) as stranger:
        assert (await stranger.get(f"/console/images/{mine}/0"))[0] == 401
    await books_balance(gateway, upstream)


async def test_pages_without_a_session_send_you_to_sign_in(gateway: Gateway) -> None:
    async with ConsoleUser(gateway) as user:
        status, _, resp = await user.get("/console/team")
        assert (status, resp.headers["Location"]) == (303, "/console/")
        status, body, _ = await user.get("/console/admin.json")
        assert (status, json.loads(body)["error"]["code"]) == (401, "not_signed_in")
        status, _, resp = await user.get("/console")
        assert (status, resp.headers["Location"]) == (303, "/console/")


# -- sessions ---------------------------------------------------------------------------------


async def test_the_key_becomes_a_strict_session_cookie_and_goes_nowhere_else(
    gateway: Gateway,
) -> None:
    async with ConsoleUser(gateway) as user:
        status, page, resp = await user.get("/console/")
        assert status == 200 and 'name="key" type="password"' in page
        (form_cookie,) = resp.headers.getall("Set-Cookie")
        resp = await user.sign_in(TEAM_KEYS["design"])
        assert resp.headers["Location"] == "/console/team"
        cookies = resp.headers.getall("Set-Cookie")
        session = next(c for c in cookies if c.startswith("igw_console="))
        value = user.session_cookie()
    for cookie in (form_cookie, session):
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
        assert {"httponly", "samesite", "path", "max-age"} <= attributes
        assert "SameSite=Strict" in cookie and "Path=/console" in cookie
        assert "secure" not in attributes  # plain HTTP here; TLS sets it
    assert "Max-Age=28800" in session  # 8 hours
    design = TEAM_KEYS["design"]
    assert design not in value and key_digest(design) not in value
    assert design not in json.dumps(await gateway.log_lines())


async def test_a_session_ends_when_its_key_is_removed_or_expires(
    start_gateway: Any, upstream: Upstream, tmp_path: Path
) -> None:
    contractor = {"name": "contractor", "sha256": key_digest(NAMED_KEYS["contractor"]),
                  "expires": datetime(2026, 11, 27, tzinfo=UTC)}  # fmt: skip
    teams = {"design": {"keys": [contractor]}}
    gateway = await start_gateway(teams=teams)
    async with ConsoleUser(gateway) as expiring, ConsoleUser(gateway) as removed:
        await expiring.sign_in(NAMED_KEYS["contractor"])
        await removed.sign_in(TEAM_KEYS["ops"])
        assert (await expiring.get("/console/team"))[0] == 200
        gateway.clock.advance(days=1)
        status, _, resp = await expiring.get("/console/team")
        assert (status, resp.headers["Location"]) == (303, "/console/?m=ended")
        assert (await removed.get("/console/team"))[0] == 200
        settings = build_settings(tmp_path, upstream.url, teams={"ops": {"keys_sha256": [
            key_digest("igw_a_new_key_for_ops_0000000000000")]}})  # fmt: skip
        gateway.app[CONFIG].reload(settings)
        status, _, resp = await removed.get("/console/team")
        assert (status, resp.headers["Location"]) == (303, "/console/?m=ended")
        assert 'igw_console=""' in resp.headers["Set-Cookie"]  # and its cookie is cleared


async def test_a_restart_ends_sessions_unless_the_fleet_shares_a_secret_file(
    start_gateway: Any, tmp_path: Path
) -> None:
    first, second = await start_gateway(), await start_gateway()
    async with ConsoleUser(first) as user:
        await user.sign_in(TEAM_KEYS["design"])
        cookie = user.session_cookie()
    async with ConsoleUser(second) as user:
        user.http.cookie_jar.update_cookies({"igw_console": cookie})
        assert (await user.get("/console/team"))[0] == 303  # another secret: no session
    (tmp_path / "console-secret").write_text("s3cret-shared-by-the-fleet-0123456789\n")
    shared = {"console": {"secret_file": "console-secret"}}
    a, b = await start_gateway(**shared), await start_gateway(**shared)
    async with ConsoleUser(a) as user:
        await user.sign_in(TEAM_KEYS["design"])
        cookie = user.session_cookie()
    async with ConsoleUser(b) as user:
        user.http.cookie_jar.update_cookies({"igw_console": cookie})
        assert (await user.get("/console/team"))[0] == 200


async def test_a_forged_or_old_cookie_is_no_session(gateway: Gateway) -> None:
    state = gateway.app[CONSOLE]
    async with ConsoleUser(gateway) as user:
        await user.sign_in(ADMIN_KEY)
        good = user.session_cookie()
        payload, _, mac = good.partition(".")
        flipped = ("B" if mac[0] != "B" else "C") + mac[1:]
        for forged in (f"{payload}.{flipped}", f"x{payload}.{mac}", payload, "x", ""):
            user.http.cookie_jar.clear()
            user.http.cookie_jar.update_cookies({"igw_console": forged})
            assert (await user.get("/console/admin"))[0] == 303, forged
        session = unseal(state.secret, good, time.time())
        assert session is not None
        old = seal(state.secret, replace(session, issued_at=session.issued_at - SESSION_S - 1))
        user.http.cookie_jar.clear()
        user.http.cookie_jar.update_cookies({"igw_console": old})
        assert (await user.get("/console/admin"))[0] == 303


# -- sign-in failures -------------------------------------------------------------------------


async def test_failed_sign_ins_are_counted_and_slow_their_address_only(gateway: Gateway) -> None:
    before = await metric(gateway, "gateway_console_signin_failures_total")
    throttle = gateway.app[CONSOLE].throttle
    async with ConsoleUser(gateway) as user:
        token = await user.token()
        for key in ("igw_not_a_key_of_anyone_000000000", TEAM_KEYS["design"] + "x"):
            status, page, _ = await user.post("/console/signin", {"key": key, "csrf": token})
            assert status == 401 and "not valid here" in page
            assert key not in page
        assert len(throttle) == 1
        assert throttle.turn("127.0.0.1") is not None  # queued behind its earlier failures
        assert throttle.turn("10.1.2.3") == 0.0  # everyone else: at once
        await user.sign_in(TEAM_KEYS["design"])  # a right key still gets in, after its turn
        assert len(throttle) == 0
    assert await metric(gateway, "gateway_console_signin_failures_total") == before + 2


# -- forms ------------------------------------------------------------------------------------


async def test_forms_without_their_token_are_refused(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5})
    upstream.faults.add(hang())
    lost = await generate(gateway, quality="high")
    async with ConsoleUser(gateway) as admin, ConsoleUser(gateway) as other:
        other_token = await other.token()
        await admin.token()  # the admin's browser has its own sign-in cookie
        for token in ({}, {"csrf": other_token}, {"csrf": ""}):
            status, page, _ = await admin.post("/console/signin", {"key": ADMIN_KEY, **token})
            assert status == 403 and "security token" in page
        await admin.sign_in(ADMIN_KEY)
        resolve = f"/console/admin/ledger/{lost}/resolve"
        form = {"state": "released", "reason": "forged"}
        for token in ({}, {"csrf": other_token}, {"csrf": "x" * 43}):
            assert (await admin.post(resolve, {**form, **token}))[0] == 403
            assert (await admin.post("/console/signout", token))[0] == 403
        assert (await admin.get("/console/admin"))[0] == 200  # still signed in
    (entry,) = await gateway.db.entries(LedgerQuery())
    assert entry.state == "uncertain"
    await books_balance(gateway, upstream)


async def test_the_resolve_form_does_what_the_admin_api_does(
    start_gateway: Any, upstream: Upstream
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5})
    served = asyncio.Event()
    upstream.faults.add(lost_answer(served))  # generated, the answer lost
    lost = await generate(gateway, quality="high", n=2)
    await served.wait()
    await gateway.settled()  # the answer goes out before its uncertain settlement is stored
    async with ConsoleUser(gateway) as admin:
        await admin.sign_in(ADMIN_KEY)
        token = await admin.token("/console/admin")
        resolve = f"/console/admin/ledger/{lost}/resolve"
        for form, status, says in (
            ({"state": "captured", "reason": " "}, 400, "reason is required"),
            ({"state": "kept", "reason": "x"}, 400, "state must be"),
            ({"state": "captured", "images": "3", "reason": "x"}, 400, "more than the 2 held"),
            ({"state": "captured", "images": "-1", "reason": "x"}, 400, "whole number"),
        ):
            got, page, _ = await admin.post(resolve, {**form, "csrf": token})
            assert (got, says in page) == (status, True), form
            assert f'id="entry-{lost}"' in page  # the form is still there to correct
        form = {"state": "captured", "images": "2", "reason": "billed", "csrf": token}
        status, _, resp = await admin.post(resolve, form)
        assert (status, resp.headers["Location"]) == (303, f"/console/admin?resolved={lost}")
        status, page, _ = await admin.get(f"/console/admin?resolved={lost}")
        assert "captured 2 of 2 images, 0.8000 CNY moved from uncertain to spent" in page
        status, page, _ = await admin.post(resolve, form)
        assert status == 409 and "already resolved" in page
        assert (await admin.post("/console/admin/ledger/req_nobody/resolve", form))[0] == 404
    (entry,) = await gateway.db.entries(LedgerQuery())
    assert entry.resolution is not None
    resolution = entry.resolution
    # ADMIN_KEY is unnamed: it acts as sha256:<first 8 hex>, as over the admin API
    actor = "sha256:" + key_digest(ADMIN_KEY)[:8]
    assert (entry.state, resolution.images, resolution.actor) == ("captured", 2, actor)
    await books_balance(gateway, upstream)


# -- who sees what ----------------------------------------------------------------------------


async def test_a_team_session_gets_403_on_the_admin_view_and_other_teams(
    gateway: Gateway, upstream: Upstream
) -> None:
    await generate(gateway, TEAM_KEYS["ops"])
    async with ConsoleUser(gateway) as user:
        await user.sign_in(TEAM_KEYS["design"])
        for path in ("/console/admin", "/console/admin.json", "/console/team?team=ops",
                     "/console/team.json?team=ops"):  # fmt: skip
            assert (await user.get(path))[0] == 403, path
        assert (await user.get("/console/team?team=design"))[0] == 200
    async with ConsoleUser(gateway) as admin:
        await admin.sign_in(ADMIN_KEY)
        assert (await admin.json("/console/team.json?team=ops"))["team"] == "ops"
        assert (await admin.get("/console/team?team=nobody"))[0] == 404
        data = await admin.json("/console/admin.json?sort=-remaining")
        assert [t["team"] for t in data["teams"]] == ["design", "ops"]
        data = await admin.json("/console/admin.json")  # the least remaining first
        assert [t["team"] for t in data["teams"]] == ["ops", "design"]
        assert [i["instance"] for i in data["instances"]] == [gateway.app[DB].instance_id]
        async with aiohttp.ClientSession() as http:  # the admin API's view of the upstreams
            async with http.get(
                gateway.url + "/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            ) as resp:
                upstreams = (await resp.json())["upstreams"]
        assert [
            {k: v for k, v in u.items() if k != "base_url"} for u in data["upstreams"]
        ] == upstreams
        assert [u["base_url"] for u in data["upstreams"]] == [
            gateway.settings.upstreams[0].base_url
        ]
    await books_balance(gateway, upstream)


# -- the page itself --------------------------------------------------------------------------


async def test_every_console_answer_is_locked_down(gateway: Gateway) -> None:
    async with ConsoleUser(gateway) as user:
        await user.sign_in(TEAM_KEYS["design"])
        for path, status in (("/console/team", 200), ("/console/nothing", 404),
                             ("/console/static/console.css", 200)):  # fmt: skip
            got, _, resp = await user.get(path)
            assert got == status, path
            csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src" not in csp
            assert "'unsafe-inline'" not in csp
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["Cache-Control"] == "public, max-age=3600"  # the stylesheet
    for template in TEMPLATES.glob("*.html"):  # no script, no inline style, every form a POST
        text = template.read_text()
        assert "<script" not in text and "style=" not in text and "<style" not in text
        assert all(m == 'method="post"' for m in re.findall(r'method="[a-z]+"', text))
        assert text.count("<form") == text.count('name="csrf"'), template.name


async def test_the_console_can_be_switched_off(start_gateway: Any) -> None:
    gateway = await start_gateway(console={"enabled": False})
    async with ConsoleUser(gateway) as user:
        assert (await user.get("/console/"))[0] == 404


# -- the demo's one-time link -----------------------------------------------------------------


@pytest.mark.process
async def test_the_demo_banner_signs_the_team_in_once(tmp_path: Path) -> None:
    demo = GatewayProcess(None, args=("--demo", "--port", "0"), cwd=tmp_path)
    await demo.start()
    try:
        banner = await demo.stdout_until(BANNER_END)
        assert f"{demo.url}/console/" in banner
        link = re.search(r"(http://\S+/console/link\?token=\S+)", banner)
        assert link, banner
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            async with http.get(link[1]) as resp:  # follows the 303 to the team page
                assert resp.status == 200 and 'id="team">demo<' in await resp.text()
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(link[1]) as resp:
                assert resp.status == 401 and "used already" in await resp.text()
        code, stderr = await demo.stop()
    finally:
        await demo.close()
    assert code == 0 and link[1].split("token=")[1] not in stderr


async def test_hostile_bytes_in_console_urls_are_never_a_500(gateway: Gateway) -> None:
    async with ConsoleUser(gateway) as admin:
        await admin.sign_in(ADMIN_KEY)
        for path in ("/console/admin?resolved=req_%00x", "/console/admin?sort=%00",
                     "/console/team?team=%00", "/console/images/req_%00/0",
                     "/console/images/" + "r" * 300 + "/0", "/console/link?token=%00"):  # fmt: skip
            status, _, _ = await admin.get(path)
            assert status < 500, path
        token = await admin.token("/console/admin")
        for body in ("state=released&reason=%00", "state=%ED%B3%BF&reason=x"):
            async with admin.http.post(
                gateway.url + "/console/admin/ledger/req_x/resolve",
                data=f"{body}&csrf={token}".encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as resp:
                assert resp.status < 500, body
        async with admin.http.post(
            gateway.url + "/console/signin", data=b"key=\xff\xfe&csrf=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as resp:  # fmt: skip
            assert resp.status == 400


async def test_pages_are_computed_a_few_at_a_time(gateway: Gateway) -> None:
    """Reloading a page in a loop cannot take the CPU the paid requests need."""
    pages = gateway.app[CONSOLE].pages
    async with ConsoleUser(gateway) as user:
        await user.sign_in(TEAM_KEYS["design"])
        for _ in range(PAGES_AT_ONCE):
            await pages.acquire()
        waiting = asyncio.create_task(user.get("/console/team.json"))
        deadline = time.monotonic() + 10
        while not pages._waiters:  # the page waits its turn
            assert time.monotonic() < deadline and not waiting.done()
            await asyncio.sleep(0.01)
        pages.release()
        assert (await waiting)[0] == 200
        pages.release()


async def test_behind_a_trusted_tls_proxy_the_cookie_is_secure_and_the_client_is_its_own(
    start_gateway: Any,
) -> None:
    gateway = await start_gateway(server={"trusted_proxies": ["127.0.0.0/8"]})
    throttle = gateway.app[CONSOLE].throttle

    async def sign_in(key: str, **headers: str) -> aiohttp.ClientResponse:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.get(gateway.url + "/console/", headers=headers) as resp:
                form_cookie = resp.cookies["igw_console_signin"]
                token = TOKEN.search(await resp.text())[1]  # type: ignore[index]
            async with http.post(
                gateway.url + "/console/signin",
                data={"key": key, "csrf": token},
                headers={"Cookie": f"igw_console_signin={form_cookie.value}", **headers},
                allow_redirects=False,
            ) as resp:
                await resp.read()
                return resp

    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    resp = await sign_in(TEAM_KEYS["design"], **proxied)
    assert resp.status == 303 and resp.cookies["igw_console"]["secure"]
    assert not (await sign_in(TEAM_KEYS["design"])).cookies["igw_console"]["secure"]
    assert (await sign_in("igw_wrong_key_0000000000000000", **proxied)).status == 401
    assert throttle.turn("203.0.113.9") not in (None, 0.0)  # the client, not the proxy
    assert throttle.turn("127.0.0.1") == 0.0

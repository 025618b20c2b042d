"""The console in a real headless Chromium (issue 24), against a real gateway on both engines.

A team signs in, reads its remaining budget and sees the thumbnail of the request it just made;
an admin resolves an uncertain entry from the page and ``ledger list`` shows it resolved, with
the actor; a team session is refused the admin view and another team's data (403); a form
forged on another site, without its token, is refused; a test's browser keeps nothing of the
test before it (the tests of a worker share one Chromium). The SQLite runs take the README's
screenshots; with ``IMAGE_GATEWAY_SCREENSHOTS=1`` they are written to ``docs/``
(``console-team.png``, ``console-admin.png``), else to the test's own folder, so a plain test
run leaves the working tree as it found it.
"""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from selenium.webdriver.support.ui import WebDriverWait

from gateway.core.auth import key_digest
from gateway.http.console.render import cny
from gateway.services.usage import usage_report
from gateway.store.base import LedgerQuery
from tests.browser import WAIT_S, Browser, worker_chromium
from tests.conftest import (
    ADMIN_KEY,
    NAMED_ADMIN_KEYS,
    NAMED_KEYS,
    TEAM_KEYS,
    Gateway,
    Upstream,
    books_balance,
)
from tests.console import cli
from tests.fakes import FakeClock, hang

DOCS = Path(__file__).resolve().parent.parent / "docs"


def shots(tmp_path: Path) -> Path:
    """Where screenshots go: ``docs/`` when asked for (to refresh the README's), else aside."""
    return DOCS if os.environ.get("IMAGE_GATEWAY_SCREENSHOTS") == "1" else tmp_path


ML_KEY = NAMED_KEYS["contractor"]  # the key of a third team, "ml"
KEYS = {"design": TEAM_KEYS["design"], "ops": TEAM_KEYS["ops"], "ml": ML_KEY,
        "web-app": NAMED_KEYS["web-app"], "batch": NAMED_KEYS["batch"]}  # fmt: skip
TEAMS = {
    "design": {
        "budget_cny": "300.00",
        "keys": [
            {"name": "web-app", "sha256": key_digest(NAMED_KEYS["web-app"])},
            {"name": "batch", "sha256": key_digest(NAMED_KEYS["batch"]), "budget_cny": "40.00"},
        ],
    },
    "ml": {"keys_sha256": [key_digest(ML_KEY)], "budget_cny": "5.00", "period": "daily"},
}


async def generate(gateway: Gateway, key: str = "design", suffix: str = "", **body: Any) -> str:
    """A generation with one of ``KEYS``; its ledger id."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway.url}/v1/images/generations{suffix}",
            headers={"Authorization": f"Bearer {KEYS[key]}"},
            json={"prompt": "a lighthouse at dawn", **body},
        ) as resp:
            await resp.read()
            return resp.headers["X-Request-ID"]


async def sign_in(browser: Browser, gateway: Gateway, key: str) -> None:
    await browser.open(gateway.url + "/console/")
    await browser.type_into("#key", key)
    await browser.submit("button[type=submit]")


async def cookies(browser: Browser) -> set[str]:
    """The names of the cookies the browser would send to the page it shows."""
    return {cookie["name"] for cookie in await browser.do(lambda d: d.get_cookies())}


async def wait_for_image(browser: Browser, css: str) -> int:
    """The natural width of the image at ``css`` once it has loaded (scrolled into view)."""
    element = await browser.find(css)
    await browser.script("arguments[0].scrollIntoView()", element)
    return await browser.do(
        lambda d: WebDriverWait(d, WAIT_S).until(
            lambda d: d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", element
            )
        )
    )


async def test_a_team_reads_its_budget_and_sees_the_image_it_just_made(
    start_gateway: Any, upstream: Upstream, browser: Browser, backend: str, tmp_path: Path
) -> None:
    clock = FakeClock(datetime(2026, 11, 19, 9, 30, tzinfo=UTC))
    gateway = await start_gateway(with_clock=clock, teams=TEAMS, upstream={"timeout_s": 0.5})
    for day in range(8):  # a week of traffic for the charts
        for key, quality, n in (("web-app", "medium", 1 + day % 3), ("batch", "low", 2),
                                ("design", "high", 1), ("web-app", "high", day % 2)):  # fmt: skip
            if n:
                await generate(gateway, key, quality=quality, n=n, user=f"user-{day % 3}")
        clock.advance(days=1, minutes=17)
    await generate(gateway, "batch", suffix="?async=1", quality="medium")  # pending
    clock.advance(minutes=1)
    upstream.faults.add(hang())
    await generate(gateway, "web-app", quality="high")  # uncertain
    clock.advance(minutes=1)
    just_made = await generate(gateway, "web-app", quality="medium", n=2, user="alice")
    await gateway.settled()

    await sign_in(browser, gateway, KEYS["web-app"])
    assert (await browser.url()).endswith("/console/team")
    report = await usage_report(gateway.db, gateway.settings, clock(), only="design")
    remaining = report["teams"]["design"]["remaining_cny"]
    assert await browser.text("#remaining") == cny(remaining)
    assert await browser.text("#uncertain") == cny(report["teams"]["design"]["uncertain_cny"])
    first = "#requests tbody tr:first-child img.thumb"
    src = await browser.attribute(first, "src")
    assert src.endswith(f"/console/images/{just_made}/0")
    assert await wait_for_image(browser, first) == 96  # the simulator's 1:1 image
    assert await wait_for_image(browser, "#requests tbody tr:first-child a:nth-of-type(2) img")
    if backend == "sqlite":
        await browser.script("window.scrollTo(0, 0)")
        await browser.screenshot(shots(tmp_path) / "console-team.png")
    await browser.open(src)  # the thumbnail's link: the image at full size
    assert await browser.script("return document.contentType") == "image/png"
    await books_balance(gateway, upstream)


async def test_an_admin_resolves_an_uncertain_entry_from_the_page(
    start_gateway: Any, upstream: Upstream, browser: Browser, backend: str, tmp_path: Path
) -> None:
    alice = {"name": "alice", "sha256": key_digest(NAMED_ADMIN_KEYS["alice"])}
    gateway = await start_gateway(teams=TEAMS, upstream={"timeout_s": 0.5}, admin={"keys": [alice]})
    for key, quality, n in (("design", "high", 3), ("web-app", "medium", 4), ("ops", "low", 5),
                            ("ml", "high", 10), ("ml", "medium", 1)):  # fmt: skip
        await generate(gateway, key, quality=quality, n=n)
    upstream.faults.add(hang())
    lost = await generate(gateway, "ops", quality="medium", n=2)
    upstream.faults.add(hang())
    other = await generate(gateway, "design", quality="high")
    await gateway.settled()

    await sign_in(browser, gateway, NAMED_ADMIN_KEYS["alice"])
    assert (await browser.url()).endswith("/console/admin")
    assert await browser.text(".who") == "alice"
    teams = [await browser.text(f"#teams tbody tr:nth-child({i}) td") for i in (1, 2, 3)]
    assert teams == ["ml", "ops", "design"]  # the least remaining first
    assert await browser.text(f"#entry-{other} td:nth-child(5)") == "0.40"
    if backend == "sqlite":
        await browser.screenshot(shots(tmp_path) / "console-admin.png")
    form = f"#entry-{lost} form"
    await browser.click(f"{form} input[value=released]")
    reason = "not in the provider's usage details for 2026-11"
    await browser.type_into(f"{form} input[name=reason]", reason)
    await browser.submit(f"{form} button")
    assert "released" in await browser.text("#notice")
    assert f"#entry-{lost}" not in await browser.script("return document.body.innerHTML")

    code, out, err = await cli(gateway, tmp_path, "ledger", "list", "--id", lost, "--json")
    assert code == 0, err
    (entry,) = json.loads(out)["entries"]
    assert entry["state"] == "released"
    assert entry["resolution"]["reason"] == reason
    assert entry["resolution"]["actor"] == "alice"  # the admin key's name
    await books_balance(gateway, upstream)


async def test_a_team_session_cannot_open_the_admin_view_or_another_teams_data(
    gateway: Gateway, upstream: Upstream, browser: Browser
) -> None:
    theirs = await generate(gateway, "ops", quality="low")
    await gateway.settled()
    await sign_in(browser, gateway, TEAM_KEYS["design"])
    for path in ("/console/admin", "/console/team?team=ops", f"/console/images/{theirs}/0"):
        await browser.open(gateway.url + path)
        assert await browser.text("h1") == "403", path
    await browser.open(gateway.url + "/console/team")
    assert await browser.text("#team") == "design"
    await books_balance(gateway, upstream)


async def test_a_form_forged_on_another_site_is_refused(
    start_gateway: Any, upstream: Upstream, browser: Browser, aiohttp_server: Any
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5})
    upstream.faults.add(hang())
    lost = await generate(gateway, "design", quality="high")
    target = f"{gateway.url}/console/admin/ledger/{lost}/resolve"

    async def forged_page(request: web.Request) -> web.Response:
        return web.Response(
            text=f"""<!doctype html><form method="post" action="{target}">
            <input name="state" value="released"><input name="reason" value="pwned">
            <button id="go" type="submit">win a prize</button></form>""",
            content_type="text/html",
        )

    site = web.Application()
    site.router.add_get("/", forged_page)
    attacker = await aiohttp_server(site)
    await sign_in(browser, gateway, ADMIN_KEY)
    assert (await browser.url()).endswith("/console/admin")
    await browser.open(str(attacker.make_url("/")))
    await browser.submit("#go")
    assert await browser.text("h1") == "403"
    assert "security token" in await browser.text("#problem")
    (entry,) = await gateway.db.entries(LedgerQuery())
    assert (entry.request_id, entry.state) == (lost, "uncertain")
    await books_balance(gateway, upstream)


@pytest.mark.engines("memory")  # the browser's isolation, not the ledger's
async def test_a_browser_keeps_nothing_of_the_test_before_it(
    gateway: Gateway, request: pytest.FixtureRequest
) -> None:
    chromium = worker_chromium(request)
    async with chromium.borrow() as before:
        await sign_in(before, gateway, TEAM_KEYS["design"])
        assert (await before.url()).endswith("/console/team")
        await before.script("localStorage.left = sessionStorage.left = 'behind'")
        shown = set(await before.do(lambda d: d.window_handles))
        await before.script("window.open('/console/team')")
        opened = await before.do(
            lambda d: WebDriverWait(d, WAIT_S).until(lambda d: set(d.window_handles) - shown)
        )
        left = {*opened, await before.do(lambda d: d.current_window_handle)}
        assert "igw_console" in await cookies(before)  # the session cookie
        session = before.driver.session_id
    async with chromium.borrow() as after:
        assert after.driver.session_id == session  # the same Chromium: not a new one
        await after.open(gateway.url + "/console/team")
        assert (await after.url()).endswith("/console/")  # signed out: the sign-in form
        assert await after.find("#key")
        assert "igw_console" not in await cookies(after)
        assert await after.script("return [localStorage.left, sessionStorage.left]") == [None, None]
        assert left.isdisjoint(await after.do(lambda d: d.window_handles))
    css = [line for line in await gateway.log_lines() if line["path"].endswith("/console.css")]
    assert len(css) == 2  # the stylesheet (max-age=3600) again: no cache of the test before


async def test_a_browser_that_died_is_replaced_before_it_is_lent(
    request: pytest.FixtureRequest,
) -> None:
    chromium = worker_chromium(request)
    async with chromium.borrow() as before:
        session = before.driver.session_id
        driver_pid = before.driver.service.process.pid
    threads = Path(f"/proc/{driver_pid}/task").glob("*/children")  # any of its threads forks
    (browser_pid,) = [pid for thread in threads for pid in thread.read_text().split()]
    os.kill(int(browser_pid), signal.SIGKILL)  # a crash: chromedriver still answers
    async with chromium.borrow() as after:
        assert after.driver.session_id != session
        await after.open("data:text/html,<h1>alive</h1>")
        assert await after.text("h1") == "alive"

"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by selenium.

Each pytest(-xdist) worker starts one Chromium, at its first browser test, and stops it when the
session ends, interrupted or not: a start costs about a second of a core, as much as a short
test. Each test borrows a WebDriver BiDi *user context* of it (``browser.createUserContext``): a
profile of its own, in memory, with no cookie, storage, cache or window of any test before it,
removed with every window it opened when the test ends. A browser that does not answer (crashed,
killed, hung) or still holds a context is replaced before it is lent.

Selenium blocks, and the gateway under test runs on the test's own event loop: every browser
call runs in a worker thread (``await browser.do(...)``) so the loop keeps serving the pages.
Background networking is off: on a machine without internet it would stall the browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import urllib3
import websocket
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.timeouts import Timeouts
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)
WAIT_S = 20
PROBE_S = 10  # an idle browser answers in milliseconds; one that does not is replaced
# how a dead or hung browser answers: chromedriver's errors, its HTTP port closed, BiDi's socket
BROKEN = (WebDriverException, urllib3.exceptions.HTTPError, websocket.WebSocketException, OSError)
T = TypeVar("T")


class Browser:
    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    async def do(self, action: Callable[[WebDriver], T]) -> T:
        return await asyncio.to_thread(action, self.driver)

    async def open(self, url: str) -> None:
        await self.do(lambda d: d.get(url))

    async def find(self, css: str) -> WebElement:
        """The first element matching ``css``, waiting for it to appear."""
        return await self.do(
            lambda d: WebDriverWait(d, WAIT_S).until(lambda d: d.find_element(By.CSS_SELECTOR, css))
        )

    async def text(self, css: str) -> str:
        element = await self.find(css)
        return await self.do(lambda _: element.text)

    async def type_into(self, css: str, value: str) -> None:
        element = await self.find(css)
        await self.do(lambda _: element.send_keys(value))

    async def click(self, css: str) -> None:
        element = await self.find(css)
        await self.do(lambda _: element.click())

    async def submit(self, css: str) -> None:
        """Click ``css`` and wait for the page it leads to (a new document)."""
        await self.script("window.igwBefore = true")
        await self.click(css)
        await self.do(
            lambda d: WebDriverWait(d, WAIT_S, ignored_exceptions=(WebDriverException,)).until(
                lambda d: d.execute_script(
                    "return document.readyState === 'complete' && !window.igwBefore"
                )
            )
        )

    async def script(self, source: str, *args: Any) -> Any:
        return await self.do(lambda d: d.execute_script(source, *args))

    async def screenshot(self, path: Path, width: int = 1280) -> None:
        """The whole page as a PNG at ``width`` pixels wide."""
        height = await self.script("return document.documentElement.scrollHeight")
        await self.do(lambda d: d.set_window_size(width, min(int(height) + 40, 4000)))
        await self.do(lambda d: d.save_screenshot(str(path)))

    async def url(self) -> str:
        return await self.do(lambda d: d.current_url)

    async def attribute(self, css: str, name: str) -> str:
        element = await self.find(css)
        return await self.do(lambda _: element.get_attribute(name) or "")


def chromium_or_skip() -> None:
    """Skip without Chromium, saying how to install it; under CI (``CI`` set), fail instead."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    hint = "apt-get install chromium chromium-driver (.ci/run installs them)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests need {CHROMIUM} and {CHROMEDRIVER}: {hint}")
    pytest.skip(f"no {CHROMIUM} and {CHROMEDRIVER}: {hint}")


class Chromium:
    """This worker's Chromium and its chromedriver: started on demand, lent one context at a time."""

    def __init__(self, profiles: pytest.TempPathFactory) -> None:
        self.profiles = profiles
        self.driver: WebDriver | None = None

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[Browser]:
        """A new user context in a window of its own; removed, with all its windows, after."""
        driver = await self._answering()
        context = await asyncio.to_thread(open_context, driver)
        try:
            yield Browser(driver)
        finally:
            try:
                await promptly(driver.browser.remove_user_context, context)
            except (TimeoutError, *BROKEN):
                self.stop()

    def stop(self) -> None:
        """Kill the browser's process group and reap its chromedriver.

        Not selenium's ``quit``: it closes its BiDi socket first, racing the socket's own thread,
        and often waits out the socket's timeout (10 s); the thread ends with the killed driver.
        """
        driver, self.driver = self.driver, None
        if driver is None:
            return
        process = driver.service.process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # before the reap: its id is not reused yet
        process.wait()
        driver.service.stop()  # closes its pipes

    async def _answering(self) -> WebDriver:
        if self.driver is not None:
            try:
                await promptly(is_idle, self.driver)
            except (TimeoutError, *BROKEN):
                self.stop()
        if self.driver is None:
            self.driver = await asyncio.to_thread(start, self.profiles.mktemp("chromium"))
        return self.driver


def start(profile: Path) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.enable_bidi = True  # for user contexts
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # a process group of its own: Chromium outlives a killed chromedriver, the group does not
    service = Service(str(CHROMEDRIVER), popen_kw={"process_group": 0})
    driver = webdriver.Chrome(service=service, options=options)
    client = driver.command_executor.client_config
    client.timeout = 3 * WAIT_S  # no command waits forever on a hung browser (default: no limit)
    client.websocket_timeout = PROBE_S
    client.websocket_interval = 0.002  # selenium polls for BiDi answers, by default every 100 ms
    return driver


def is_idle(driver: WebDriver) -> None:
    """Raise unless both of the driver's channels (HTTP, BiDi) answer and nothing is lent out."""
    if len(driver.window_handles) != 1 or driver.browser.get_user_contexts() != ["default"]:
        raise WebDriverException("a window or a user context was left behind")


def open_context(driver: WebDriver) -> str:
    """A new user context in a window of its own, the driver's timeouts reset: its id."""
    context: str = driver.browser.create_user_context()
    driver.switch_to.window(driver.browsing_context.create(type="window", user_context=context))
    driver.timeouts = Timeouts(implicit_wait=0, page_load=WAIT_S, script=30)
    driver.set_window_size(1280, 900)
    return context


async def promptly(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` in a thread, or TimeoutError after PROBE_S (a hung browser never answers)."""
    return await asyncio.wait_for(asyncio.to_thread(call, *args), PROBE_S)


WORKER_CHROMIUM = pytest.StashKey[Chromium]()


def worker_chromium(request: pytest.FixtureRequest) -> Chromium:
    """The session's Chromium (one per xdist worker), stopped when the session ends."""
    chromium_or_skip()
    session = request.session
    if WORKER_CHROMIUM not in session.stash:
        chromium = Chromium(request.getfixturevalue("tmp_path_factory"))
        session.stash[WORKER_CHROMIUM] = chromium
        session.addfinalizer(chromium.stop)
    return session.stash[WORKER_CHROMIUM]


@pytest.fixture
async def browser(request: pytest.FixtureRequest) -> AsyncIterator[Browser]:
    async with worker_chromium(request).borrow() as lent:
        yield lent

"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by selenium.

Selenium blocks, and the gateway under test runs on the test's own event loop: every browser
call runs in a worker thread (``await browser.do(...)``) so the loop keeps serving the pages.
Background networking is off: on a machine without internet it would stall the browser.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
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


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    chromium_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    service = Service(str(CHROMEDRIVER))
    driver = await asyncio.to_thread(webdriver.Chrome, service=service, options=options)
    driver.set_page_load_timeout(WAIT_S)
    await asyncio.to_thread(driver.set_window_size, 1280, 900)
    try:
        yield Browser(driver)
    finally:
        await asyncio.to_thread(driver.quit)

"""The dashboard in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, via Selenium).

While traffic flows, one provider is taken down (its upstreams stop listening); the page — updated by
server-sent events, never reloaded — must show it down within two seconds, and back up after it
recovers. ``SKYFABRIC_SCREENSHOT=docs/dashboard.png`` also saves what the operator sees mid-outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream

KEY = "sk-test-key-0001"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FEED_KINDS = "return [...document.querySelectorAll('#feed li')].map(e => e.dataset.kind);"


def browser() -> Any:
    """Headless Chromium from the distribution; never a downloaded one."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: apt-get install -y them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1500,1000")
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def health_of(driver: Any, provider: str) -> str | None:
    """The provider's health word as the page shows it now (the summary pill in the header)."""
    value: str | None = driver.execute_script(
        "const p = document.querySelector(`.pill[data-provider='${arguments[0]}']`);"
        "return p ? p.dataset.health : null;",
        provider,
    )
    return value


def wait_for(driver: Any, provider: str, health: str, timeout: float) -> float:
    """Seconds until the page shows ``provider`` as ``health``; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if health_of(driver, provider) == health:
            return time.monotonic() - start
        time.sleep(0.02)
    shown = health_of(driver, provider)
    raise AssertionError(f"{provider} not shown {health} within {timeout}s (shows {shown})")


async def test_browser_shows_a_provider_down_within_two_seconds_and_back(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    aws = [FakeUpstream("aws-0", tokens=24), FakeUpstream("aws-1", tokens=24)]
    gcp = [FakeUpstream("gcp-0", tokens=24)]
    azure = [FakeUpstream("azure-0", tokens=24)]
    for up in [*aws, *gcp, *azure]:
        up.token_delay = 0.01
    gw = await make_gateway(
        {"aws": {"us-east-1": aws}, "gcp": {"europe-west4": gcp}, "azure": {"eastus": azure}},
        api_keys=[{"key": KEY}],
        health={"probe_interval": 0.25, "base_ejection": 1.0},
        observability={"dashboard_interval": 0.5},
    )
    client = gw.client()

    async def traffic() -> None:
        while True:
            with contextlib.suppress(Exception):
                stream = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                async for _ in stream:
                    pass
            await asyncio.sleep(0.03)

    load = [asyncio.create_task(traffic()) for _ in range(3)]
    driver = await asyncio.to_thread(browser)
    try:
        await asyncio.to_thread(driver.get, f"{gw.root}/dashboard")
        login = await asyncio.to_thread(driver.find_element, "name", "key")
        await asyncio.to_thread(login.send_keys, KEY)
        await asyncio.to_thread(login.submit)
        await asyncio.to_thread(wait_for, driver, "aws", "up", 10.0)
        url = await asyncio.to_thread(lambda: driver.current_url)
        assert url.endswith("/dashboard")
        # A few seconds of charts before the outage (more when the picture is kept for the docs).
        await asyncio.sleep(20.0 if os.environ.get("SKYFABRIC_SCREENSHOT") else 3.0)

        for up in aws:
            await up.stop()
        down_after = await asyncio.to_thread(wait_for, driver, "aws", "down", 2.0)
        assert down_after < 2.0
        assert await asyncio.to_thread(driver.current_url.__str__) == url  # no reload, no navigation
        causes = await asyncio.to_thread(
            driver.execute_script,
            "return [...document.querySelectorAll(`.endpoint[data-health='down'] .cause`)]"
            ".map(e => e.textContent);",
        )
        assert len(causes) == 2 and all(c.startswith("ejected: ") for c in causes), causes
        assert health_of(driver, "gcp") == "up" and health_of(driver, "azure") == "up"
        # Let the feed and the charts show the outage.
        await asyncio.sleep(4.0 if os.environ.get("SKYFABRIC_SCREENSHOT") else 2.0)
        feed = await asyncio.to_thread(driver.execute_script, FEED_KINDS)
        assert "ejection" in feed
        shot = os.environ.get("SKYFABRIC_SCREENSHOT") or str(tmp_path / "dashboard.png")
        await asyncio.to_thread(driver.save_screenshot, shot)
        assert (await asyncio.to_thread(os.path.getsize, shot)) > 10_000

        for up in aws:
            await up.start()
        # Back: the ejection (1 s, then longer for a repeat) runs out and a probe (every 0.25 s) readmits.
        back_after = await asyncio.to_thread(wait_for, driver, "aws", "up", 8.0)
        assert back_after < 8.0
        feed = await asyncio.to_thread(driver.execute_script, FEED_KINDS)
        assert "recovery" in feed
    finally:
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        await asyncio.to_thread(driver.quit)
    for state in gw.gateway.proxy.states.values():
        assert state.outstanding == 0 and state.streaming == 0 and not state.inflight

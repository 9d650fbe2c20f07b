"""The dashboard in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, via Selenium).

While traffic flows, a drill takes one provider down (its upstreams stop listening) and announces it the
way ``skyfabric drill`` does (``drills/announce.py`` → ``POST /dashboard/drill``); the page — updated by
server-sent events, never reloaded — must show the provider down within two seconds, the drill's
timeline with the fault on, and then the provider back, the fault off and the recovery on the timeline.
``SKYFABRIC_SCREENSHOT=docs/dashboard.png`` also saves what the operator sees mid-outage.
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

from skyfabric.drills.announce import DrillAnnouncer
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


DRILL = (
    "const d = document.getElementById('drill');"
    "const faults = [...d.querySelectorAll('g.fault')]"
    "  .map(g => [g.dataset.fault, g.dataset.state, g.dataset.windows]);"
    "const marks = [...d.querySelectorAll('line.marker')].map(m => m.dataset.kind);"
    "const lines = [...d.querySelectorAll('polyline')].map(p => p.dataset.series);"
    "return {hidden: d.hidden, state: d.dataset.state, faults, marks, lines,"
    " title: document.getElementById('drill-title').textContent};"
)


def drill_shown(driver: Any, predicate: Any, timeout: float) -> dict[str, Any]:
    """The drill panel as the page shows it, once ``predicate`` holds of it; fails after ``timeout``."""
    start = time.monotonic()
    shown: dict[str, Any] = {}
    while time.monotonic() - start < timeout:
        shown = driver.execute_script(DRILL)
        if predicate(shown):
            return shown
        time.sleep(0.05)
    raise AssertionError(f"the drill timeline never showed what was expected: {shown}")


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
        # No drill yet: no timeline.
        assert (await asyncio.to_thread(driver.execute_script, DRILL))["hidden"] is True
        announcer = DrillAnnouncer(gw.root, KEY, "provider-down-test")
        assert await announcer.send("start", scenario="provider-down", duration=40.0)
        # A few seconds of charts before the outage (more when the picture is kept for the docs).
        await asyncio.sleep(12.0 if os.environ.get("SKYFABRIC_SCREENSHOT") else 3.0)

        for up in aws:
            await up.stop()
        assert await announcer.send("fault_on", fault="refuse aws", target="aws", mode="refuse")
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
        # The drill's timeline: the fault on (one open window), the gateway's ejections marked under it,
        # and what it saw on the same axis.
        during = await asyncio.to_thread(
            drill_shown, driver, lambda d: not d["hidden"] and "ejection" in d["marks"], 3.0
        )
        assert during["state"] == "running" and during["faults"] == [["refuse aws", "on", "1"]], during
        assert {"rps", "errors"} <= set(during["lines"]) and "provider-down" in during["title"]
        shot = os.environ.get("SKYFABRIC_SCREENSHOT") or str(tmp_path / "dashboard.png")
        await asyncio.to_thread(driver.save_screenshot, shot)
        assert (await asyncio.to_thread(os.path.getsize, shot)) > 10_000

        for up in aws:
            await up.start()
        assert await announcer.send("fault_off", fault="refuse aws", target="aws", mode="refuse")
        # Back: the ejection (1 s, then longer for a repeat) runs out and a probe (every 0.25 s) readmits.
        back_after = await asyncio.to_thread(wait_for, driver, "aws", "up", 8.0)
        assert back_after < 8.0
        feed = await asyncio.to_thread(driver.execute_script, FEED_KINDS)
        assert "recovery" in feed
        after = await asyncio.to_thread(
            drill_shown, driver, lambda d: "recovery" in d["marks"] and d["faults"][0][1] == "off", 3.0
        )
        assert after["faults"] == [["refuse aws", "off", "1"]], after
        assert await announcer.send("end")
        ended = await asyncio.to_thread(drill_shown, driver, lambda d: d["state"] == "ended", 3.0)
        assert "ended after" in ended["title"]
        await announcer.close()
    finally:
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        await asyncio.to_thread(driver.quit)
    for state in gw.gateway.proxy.states.values():
        assert state.outstanding == 0 and state.streaming == 0 and not state.inflight

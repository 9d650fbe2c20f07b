"""``skyfabric status``: the dashboard's picture in a terminal, refreshing (rich).

It reads the gateway's ``/dashboard/state`` (the same snapshot the web dashboard starts from) with the
fleet's API key, and draws the fleet tree with each endpoint's health and the cause of its ejection, a
line per provider with its recent figures, and the newest failovers, continuations and ejections.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

_STYLE = {"up": "green", "degraded": "yellow", "down": "bold red", "cooling": "yellow", "probing": "magenta"}
_KIND = {
    "ejection": "red",
    "failover": "yellow",
    "continuation": "cyan",
    "recovery": "green",
    "hedge": "magenta",
}


def fetch_state(url: str, key: str | None, timeout: float = 5.0) -> dict[str, Any]:
    """The gateway's dashboard snapshot; raises ``urllib.error.URLError`` when it cannot be read."""
    request = urllib.request.Request(url.rstrip("/") + "/dashboard/state")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: dict[str, Any] = orjson.loads(response.read())
    return data


def recent(points: list[list[Any]], seconds: float = 10.0) -> dict[str, float | None]:
    """Requests/s, error ratio, TTFT p50 (worst second) and tokens/s over the last ``seconds`` of points."""
    window, elapsed = [], 0.0
    for point in reversed(points):
        if elapsed >= seconds:
            break
        window.append(point)
        elapsed += point[1]
    if not window or elapsed <= 0:
        return {"rps": None, "errors": None, "ttft": None, "tps": None}
    attempts = sum(p[2] for p in window)
    ttfts = [p[4] for p in window if p[4] is not None]
    return {
        "rps": attempts / elapsed,
        "errors": sum(p[3] for p in window) / attempts if attempts else None,
        "ttft": max(ttfts) if ttfts else None,
        "tps": sum(p[6] for p in window) / elapsed,
    }


def render(state: dict[str, Any], source: str) -> Group:
    """One frame: the fleet tree, the providers' figures, the feed."""
    clock = time.strftime("%H:%M:%S", time.localtime(state["time"]))
    header = Text.assemble(("skyfabric ", "bold"), (f"{source} · {clock}  ", "dim"))
    for name, word in state["summary"].items():
        header.append(f" {name} {word} ", style=f"{_STYLE[word]} reverse")
        header.append(" ")

    tree = Tree("fleet", guide_style="dim")
    for provider in state["topology"]:
        word = state["summary"][provider["name"]]
        label = Text.assemble((provider["name"], "bold"), "  ", (word, _STYLE[word]))
        if provider.get("cost_per_hour"):
            label.append(f"  ${provider['cost_per_hour']:.2f}/h", style="dim")
        branch = tree.add(label)
        for region in provider["regions"]:
            r = branch.add(Text(region["name"], style="dim"))
            for pool in region["pools"]:
                p = r.add(
                    f"{pool['name']} [dim]{pool['accelerator']} · {pool['engine']} · {pool['model']}[/]"
                )
                for e in pool["endpoints"]:
                    line = Text.assemble(
                        ("● ", _STYLE[e["health"]]),
                        (e["id"], "bold" if e["health"] != "up" else ""),
                        (f"  {e['health']}", _STYLE[e["health"]]),
                        (
                            f"  {e['outstanding']} in flight · {e['successes']} ok · {e['failures']} failed",
                            "dim",
                        ),
                    )
                    if e.get("cause"):
                        line.append(f"\n  {e['cause']}", style="red")
                    p.add(line)

    figures = Table(title="last 10 s", title_justify="left", expand=False, box=None, padding=(0, 2))
    for column in ("provider", "requests/s", "errors", "TTFT p50 (max)", "tokens/s"):
        figures.add_column(column, justify="right" if column != "provider" else "left")
    for provider, points in sorted(state.get("series", {}).items()):
        f = recent(points)
        figures.add_row(
            provider,
            "–" if f["rps"] is None else f"{f['rps']:.1f}",
            "–" if f["errors"] is None else f"{f['errors']:.1%}",
            "–" if f["ttft"] is None else f"{f['ttft'] * 1000:.0f} ms",
            "–" if f["tps"] is None else f"{f['tps']:.0f}",
        )

    feed = Table(box=None, show_header=False, padding=(0, 1))
    for item in list(reversed(state.get("feed", [])))[:10]:
        feed.add_row(
            time.strftime("%H:%M:%S", time.localtime(item["t"])),
            Text(item["kind"], style=_KIND.get(item["kind"], "")),
            item["text"],
        )
    if not state.get("feed"):
        feed.add_row(Text("no failover, continuation or ejection yet", style="dim"))
    parts: list[Any] = [header]
    drill = state.get("drill")
    if drill:
        parts.append(drill_line(drill, state["time"]))
    return Group(*parts, Panel(tree, title="fleet"), figures, Panel(feed, title="events"))


def drill_line(drill: dict[str, Any], now: float) -> Text:
    """The drill the gateway was told of (``POST /dashboard/drill``): running or ended, faults on now."""
    ended = drill.get("ended")
    seconds = (ended or now) - drill["started"]
    line = Text.assemble(("drill ", "bold"), (drill.get("scenario") or drill["id"], "bold"))
    line.append(f"  {'ended after' if ended else 'running'} {seconds:.0f} s", style="dim")
    on = [f for f in drill["faults"] if f["windows"] and f["windows"][-1][1] is None]
    for fault in on:
        line.append(
            f"  {fault.get('target') or fault['fault']}: {fault.get('mode') or 'fault'} on", style="red"
        )
    if not on and not ended:
        line.append("  no fault on", style="green")
    return line


def run(url: str, key: str | None, interval: float, once: bool, console: Console | None = None) -> int:
    """Draw once, or every ``interval`` seconds until interrupted; 1 when the gateway is unreachable."""
    console = console or Console()
    try:
        state = fetch_state(url, key)
    except (urllib.error.URLError, OSError) as exc:
        console.print(f"[red]cannot read {url}/dashboard/state: {exc}[/]")
        return 1
    if once:
        console.print(render(state, url))
        return 0
    with Live(render(state, url), console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    live.update(render(fetch_state(url, key), url))
                except (urllib.error.URLError, OSError) as exc:
                    live.update(Text(f"cannot read {url}: {exc} (retrying)", style="red"))
        except KeyboardInterrupt:
            return 0

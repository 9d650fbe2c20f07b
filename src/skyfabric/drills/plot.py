"""The drill's timeline plot: what clients got, how fast, and where the gateway sent traffic, over time.

Three panels share the time axis, fault windows shaded in each: answers per second by provider with
errors on top (what clients saw), TTFT of each streamed answer by provider (how it felt), and requests
per second reaching each provider's proxies (what the gateway did: detection, retries, recovery).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from skyfabric.drills.faultproxy import ProxyEvent
from skyfabric.drills.loadclient import RequestRecord
from skyfabric.drills.timeline import FaultSpan

_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2", "#7f7f7f"]
_SHADES = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b"]


def _bins(times: Sequence[float], width: float, n: int) -> list[float]:
    """Rates per bin, with the last bin repeated so a post-step plot draws it to the end."""
    counts = [0.0] * n
    for t in times:
        i = int(t // width)
        if 0 <= i < n:
            counts[i] += 1
    rates = [c / width for c in counts]
    return [*rates, rates[-1]]


def plot_timeline(
    records: Sequence[RequestRecord],
    spans: Sequence[FaultSpan],
    events: dict[str, list[ProxyEvent]],
    path: Path,
    *,
    title: str,
    ended: float,
    stalls: Sequence[tuple[float, float]] = (),
) -> Path:
    """Write the PNG and return its path. ``stalls`` are (time, seconds) pauses of the drill itself, drawn
    as grey bands so that a latency spike they caused is not read as the gateway's."""
    width = 1.0 if ended <= 180 else 5.0
    n = max(1, math.ceil(ended / width))
    xs = [i * width for i in range(n + 1)]
    providers = sorted({r.provider for r in records if r.provider} | {eid.split("/")[0] for eid in events})
    color = {p: _COLORS[i % len(_COLORS)] for i, p in enumerate(providers)}

    fig, (ax_rate, ax_ttft, ax_edge) = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    for ax in (ax_rate, ax_ttft, ax_edge):
        for span in spans:
            for a, b in span.windows:
                ax.axvspan(a, b, color=_SHADES[span.group % len(_SHADES)], alpha=0.12, lw=0)
        for at, lag in stalls:
            ax.axvspan(at, at + max(lag, width / 10), color="#7f7f7f", alpha=0.35, lw=0)
        ax.grid(alpha=0.3)
    for span in spans:
        ax_rate.text(
            span.start, 1.01, span.label, transform=ax_rate.get_xaxis_transform(), fontsize=8, va="bottom"
        )

    for p in providers:
        ok = [r.end for r in records if r.ok and r.provider == p and r.end is not None]
        ax_rate.step(
            xs, _bins(ok, width, n), where="post", color=color[p], label=f"answered by {p}", zorder=3
        )
    errors = [r.end for r in records if not r.ok and r.end is not None]
    if errors:
        ax_rate.bar(
            xs[:-1],
            _bins(errors, width, n)[:-1],
            width=width,
            align="edge",
            color="#d62728",
            alpha=0.45,
            zorder=2,
            label="errors + truncated",
        )
    ax_rate.set_ylabel("answers / s")
    ax_rate.legend(loc="upper right", fontsize=8, ncol=2)

    for p in providers:
        pts = [(r.start, r.ttft) for r in records if r.stream and r.ttft is not None and r.provider == p]
        if pts:
            ax_ttft.scatter([a for a, _ in pts], [b for _, b in pts], s=6, color=color[p], label=p, alpha=0.7)
    failed = [(r.start, r.latency) for r in records if not r.ok and r.latency is not None]
    if failed:
        ax_ttft.scatter(
            [a for a, _ in failed],
            [b for _, b in failed],
            s=14,
            marker="x",
            color="#d62728",
            label="failed (time to failure)",
        )
    ax_ttft.set_ylabel("TTFT (s), by start time")
    if any(r.ttft for r in records):
        ax_ttft.set_yscale("log")
    ax_ttft.legend(loc="upper right", fontsize=8, ncol=2)

    for p in providers:
        times = [e.t for eid, evs in events.items() if eid.split("/")[0] == p for e in evs if e.inference]
        ax_edge.step(xs, _bins(times, width, n), where="post", color=color[p], label=f"reaching {p}")
    ax_edge.set_ylabel("upstream requests / s\n(at the proxies)")
    ax_edge.set_xlabel(
        "seconds since the drill started (shaded: faults"
        + ("; grey: the drill itself paused)" if stalls else ")")
    )
    ax_edge.legend(loc="upper right", fontsize=8, ncol=2)
    ax_edge.set_xlim(0, max(ended, 1.0))

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

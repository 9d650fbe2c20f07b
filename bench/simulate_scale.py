"""Speed of `skyfabric simulate` at fleet scale: N endpoints over three providers, R requests/s, a provider
lost for a window. Runs the gateway's own Proxy/HealthChecker on a virtual clock (see sim/fleetsim.py).

    PYTHONPATH=src python bench/simulate_scale.py --endpoints 3000 --rate 20000 --duration 60 --granularity 20

Each endpoint carries --per-endpoint req/s (default: sized so the fleet keeps 110 % of the rate with any
one provider lost). Prints the simulator's report, including wall time and × real time.
"""

from __future__ import annotations

import argparse
import logging

from skyfabric.control.plan import Offer, Plan, Requirements
from skyfabric.sim.fleetsim import Loss, Workload, render, simulate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=20000.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--granularity", type=int, default=20)
    parser.add_argument("--group", type=int, default=1, help="replicas behind one gateway endpoint")
    parser.add_argument("--probe-interval", type=float, default=1.0)
    parser.add_argument("--per-endpoint", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=64, help="slots per endpoint (client requests)")
    args = parser.parse_args()
    logging.getLogger("skyfabric.gateway").setLevel(logging.ERROR)
    per = args.per_endpoint or 1.1 * args.rate / (args.endpoints * 2 / 3)
    offers, counts = [], []
    for provider in ("aws", "gcp", "azure"):
        for region in ("r1", "r2"):
            offers.append(
                Offer(provider, region, "nvidia-l4", "vllm", 1.0, per, concurrency=args.concurrency)
            )
            counts.append(args.endpoints // 6)
    plan = Plan(offers, counts, Requirements(args.rate), float(sum(counts)))
    d = args.duration
    result = simulate(
        plan,
        "m",
        Workload(args.rate, [(700, 200)]),
        d,
        Loss("aws", d / 3, d / 3),
        granularity=args.granularity,
        group=args.group,
        fleet_overrides={"health": {"probe_interval": args.probe_interval}},
    )
    print(render(result))


if __name__ == "__main__":
    main()

"""How long `skyfabric plan` takes on a large offer set (default: 50 offers over 3 providers, 15 regions).

    PYTHONPATH=src python bench/plan_scale.py [--offers 50] [--seeds 5]

Random offers (the shipped profile table's accelerators at random prices and quotas), a peak of 5,000
requests/s, full peak after losing any provider, half after losing any region, no provider above 50 %.
Prints the solve time of each seed (HiGHS, optimality gap 0) and the worst.
"""

from __future__ import annotations

import argparse
import random
import time

from skyfabric.control.plan import DEFAULT_ENGINE, Offer, Requirements, load_profiles, plan


def offers(n: int, rng: random.Random) -> list[Offer]:
    table = load_profiles()
    kinds = sorted(table)
    out = []
    for i in range(n):
        provider = ["aws", "gcp", "azure"][i % 3]
        accel = rng.choice(kinds)
        thr = table[accel].requests_per_second
        out.append(
            Offer(
                provider,
                f"{provider}-r{rng.randrange(5)}",
                accel,
                DEFAULT_ENGINE.get(accel, "vllm"),
                round(thr * rng.uniform(0.15, 0.6), 2),  # $ per replica-hour, loosely tied to throughput
                thr,
                quota=rng.randrange(2, 40),
                name=f"o{i}",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--offers", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--peak", type=float, default=5000.0)
    args = parser.parse_args()
    req = Requirements(args.peak, survive_provider=1.0, survive_region=0.5, max_provider_share=0.5)
    worst = 0.0
    for seed in range(args.seeds):
        batch = offers(args.offers, random.Random(seed))
        started = time.perf_counter()
        result = plan(batch, req)  # three MILPs: the plan, each single provider, and no-loss
        took = time.perf_counter() - started
        worst = max(worst, took)
        print(
            f"seed {seed}: {args.offers} offers, {sum(result.replicas)} replicas, "
            f"${result.cost_per_hour:,.2f}/h, solved in {took:.3f}s"
        )
    print(f"worst: {worst:.3f}s")


if __name__ == "__main__":
    main()

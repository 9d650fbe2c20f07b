"""CPU cost of one `Cluster.pick` (the gateway's balancer) against the number of endpoints.

    PYTHONPATH=src python bench/pick_cost.py

The pick scans every endpoint of the model (least loaded of all, not power-of-two-choices), so it is
O(endpoints): this bounds how many requests/s one gateway process can route over a fleet listed
replica by replica, and how fast `skyfabric simulate` runs at that granularity.
"""

from __future__ import annotations

import time

from skyfabric.core.endpoints import Endpoint
from skyfabric.gateway.balancer import Cluster, EndpointState


def main() -> None:
    for n in (60, 600, 3000):
        states = [
            EndpointState(
                Endpoint(
                    ["aws", "gcp", "azure"][i % 3],
                    "r",
                    "p",
                    i,
                    f"http://h{i}:1/v1",
                    "m",
                    "m",
                    "vllm",
                    "x",
                    True,
                    64,
                    1.0,
                )
            )
            for i in range(n)
        ]
        for i, s in enumerate(states):
            s.outstanding = i % 7
        cluster = Cluster("m", states, slow_start=5.0)
        rounds = 300
        started = time.process_time()
        for _ in range(rounds):
            cluster.pick(100.0)
        per = (time.process_time() - started) / rounds
        print(
            f"{n:>5} endpoints: {per * 1e3:.3f} ms CPU per pick → at most {1 / per:,.0f} picks/s per process"
        )


if __name__ == "__main__":
    main()

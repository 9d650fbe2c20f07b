"""Drills: inject faults at the gateway's network edge, drive a workload through it, and report on SLOs.

A drill is a rehearsal of a bad day (a provider blackholed, a region lost, streams cut mid-answer) run
against the real gateway, unmodified, so that the report shows what a client would have seen. The pieces:

* :mod:`~skyfabric.drills.faultproxy` — the TCP/HTTP proxy in front of every upstream endpoint;
* :mod:`~skyfabric.drills.scenario` — scenario files: workload, fault timeline, SLO thresholds;
* :mod:`~skyfabric.drills.workload` and :mod:`~skyfabric.drills.trace` — arrivals, prompts, trace replay;
* :mod:`~skyfabric.drills.loadclient` — the OpenAI-SDK client that records every request;
* :mod:`~skyfabric.drills.harness` — starts replicas, proxies and the gateway, and stops them;
* :mod:`~skyfabric.drills.runner` — runs one drill end to end;
* :mod:`~skyfabric.drills.report` / :mod:`~skyfabric.drills.plot` — what people and machines read.
"""

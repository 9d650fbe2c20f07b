"""Workloads: when requests arrive, how big they are, and whether they stream.

Open-loop arrivals (Poisson, bursty, trace replay) are planned up front from the seed, so a drill and its
``--baseline`` twin send the very same requests at the very same offsets; closed-loop users draw their
requests as they go (their timing depends on the answers, by design). Output lengths are forced
(``max_tokens`` = ``min_tokens`` = N with ``ignore_eos``) so that a short answer is always a truncation,
never the model deciding to stop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from skyfabric.drills.scenario import TokenRange, Workload
from skyfabric.drills.trace import compress, default_trace, load_trace, trace_span

#: Characters per token assumed when building prompts (code tokenizers give 3–4).
CHARS_PER_TOKEN = 3.5
#: Tokens kept free in the context for the chat template and tokenizer estimate errors.
CONTEXT_MARGIN = 24

_SNIPPETS = [
    "def {name}(items, key=None):\n",
    '    """Return the {name} of the items."""\n',
    "    result = []\n",
    "    for index, item in enumerate(items):\n",
    "        if key is not None and key(item) < {n}:\n",
    "            continue\n",
    "        result.append(item * {n})\n",
    "    return sorted(result, reverse=True)\n",
    "class {cls}:\n",
    "    def __init__(self, size={n}):\n",
    "        self.size = size\n",
    "        self.cache = {{}}\n",
    "    def get(self, name):\n",
    "        return self.cache.get(name, None)\n",
    "import os\nimport sys\n",
    "# TODO: handle the empty case\n",
    'print(f"{name}: {{len(items)}} items")\n',
    "with open(path) as handle:\n    data = handle.read()\n",
]
_NAMES = ["merge", "split", "flatten", "parse", "render", "encode", "total", "window", "chunk", "lookup"]
_CLASSES = ["Buffer", "Ledger", "Router", "Cache", "Window", "Parser"]


def make_prompt(tokens: int, rng: random.Random) -> str:
    """Python-like text of about ``tokens`` tokens, ending with a request to continue it."""
    target = max(1, round(tokens * CHARS_PER_TOKEN))
    out: list[str] = []
    size = 0
    while size < target:
        line = rng.choice(_SNIPPETS).format(
            name=rng.choice(_NAMES), cls=rng.choice(_CLASSES), n=rng.randint(1, 999)
        )
        out.append(line)
        size += len(line)
    return "".join(out)[:target]


@dataclass(frozen=True, slots=True)
class Planned:
    """One request to send ``at`` seconds after the workload starts (open loop)."""

    at: float
    prompt_tokens: int
    output_tokens: int
    stream: bool


@dataclass(slots=True)
class Sizer:
    """Fits prompt and output sizes into the model's context and counts what it had to change."""

    context_length: int | None
    prompt_range: TokenRange
    output_range: TokenRange
    clamped_prompts: int = 0
    clamped_outputs: int = 0

    def fit(self, prompt: int, output: int) -> tuple[int, int]:
        """Clamp to the ranges, then shrink the prompt (and the output if need be) to fit the context."""
        p = min(max(prompt, self.prompt_range.min), self.prompt_range.max)
        o = min(max(output, self.output_range.min), self.output_range.max)
        if self.context_length is not None:
            room = self.context_length - CONTEXT_MARGIN
            o = max(1, min(o, room - 1))
            p = max(1, min(p, room - o))
        self.clamped_prompts += p != prompt
        self.clamped_outputs += o != output
        return p, o

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """Sizes drawn uniformly from the ranges (then fitted)."""
        return self.fit(
            rng.randint(self.prompt_range.min, self.prompt_range.max),
            rng.randint(self.output_range.min, self.output_range.max),
        )


@dataclass(slots=True)
class Plan:
    """What a drill will send: open-loop arrivals, or the closed-loop users' settings."""

    arrivals: list[Planned] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sizer: Sizer | None = None


def poisson_times(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Arrival offsets of a Poisson process of ``rate`` per second over ``duration`` seconds."""
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def bursty_times(
    rate: float, duration: float, rng: random.Random, *, factor: float, on: float, off: float
) -> list[float]:
    """On/off modulated Poisson arrivals: bursts of ``factor`` × ``rate`` for ``on`` s every ``on + off`` s.

    The quiet rate is set so the mean stays ``rate`` where that is possible (it is 0 when the bursts alone
    carry more than the mean).
    """
    high = rate * factor
    low = max(0.0, (rate * (on + off) - high * on) / off)
    times: list[float] = []
    t = 0.0
    while t < duration:
        for length, r in ((on, high), (off, low)):
            end = min(t + length, duration)
            if r > 0:
                s = t + rng.expovariate(r)
                while s < end:
                    times.append(s)
                    s += rng.expovariate(r)
            t = end
            if t >= duration:
                break
    return times


def plan_workload(
    workload: Workload, *, duration: float, speed: float, seed: int, context_length: int | None
) -> Plan:
    """Plan the open-loop arrivals (all but ``closed``), with notes for the report on what was changed."""
    rng = random.Random(seed)
    sizer = Sizer(context_length, workload.prompt_tokens, workload.output_tokens)
    plan = Plan(sizer=sizer)
    if workload.kind == "closed":
        plan.notes.append(
            f"closed loop: {workload.users} users, mean think time {workload.think_time / speed:.2f}s"
        )
        return plan
    if workload.kind == "trace":
        path = workload.trace or str(default_trace())
        trace = load_trace(path)
        rows = compress(trace, speed=speed, start=workload.trace_start, duration=duration)
        for at, row in rows:
            p, o = sizer.fit(
                math.ceil(row.context_tokens * workload.prompt_scale),
                math.ceil(row.generated_tokens * workload.output_scale),
            )
            plan.arrivals.append(Planned(at, p, o, rng.random() < workload.stream_fraction))
        plan.notes.append(
            f"trace replay of {path} from {workload.trace_start:g}s at speed ×{speed:g}: "
            f"{len(rows)} requests in {duration:g}s ({len(rows) / duration:.2f}/s)"
        )
        wanted, span = workload.trace_start + duration * speed, trace_span(trace)
        if wanted > span + 1.0:  # a quiet last second is not worth a note
            plan.notes.append(
                f"the trace ends {span:g}s in, before the {wanted:g}s this drill replays: its last "
                f"{(wanted - span) / speed:g}s get no requests (a longer trace: --trace PATH)"
            )
        plan.notes.append(
            f"token counts scaled (prompt ×{workload.prompt_scale:g}, output ×{workload.output_scale:g}) and "
            f"clamped to prompt {workload.prompt_tokens.min}–{workload.prompt_tokens.max}, output "
            f"{workload.output_tokens.min}–{workload.output_tokens.max}"
            + (f", within a {context_length}-token context" if context_length else "")
            + f": {sizer.clamped_prompts} prompts and {sizer.clamped_outputs} outputs differ from the scaled"
            " trace values"
        )
        return plan
    rate = workload.rate * speed
    if workload.kind == "bursty":
        times = bursty_times(
            rate, duration, rng, factor=workload.burst_factor, on=workload.burst_on, off=workload.burst_off
        )
        plan.notes.append(
            f"bursty arrivals: mean {rate:g}/s, bursts of ×{workload.burst_factor:g} for "
            f"{workload.burst_on:g}s every {workload.burst_on + workload.burst_off:g}s"
        )
    else:
        times = poisson_times(rate, duration, rng)
        plan.notes.append(f"Poisson arrivals at {rate:g}/s")
    for at in times:
        p, o = sizer.draw(rng)
        plan.arrivals.append(Planned(at, p, o, rng.random() < workload.stream_fraction))
    if sizer.clamped_prompts or sizer.clamped_outputs:
        plan.notes.append(
            f"{sizer.clamped_prompts} prompts and {sizer.clamped_outputs} outputs shrunk to fit a "
            f"{context_length}-token context"
        )
    return plan

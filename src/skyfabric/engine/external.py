"""Engines that are their own server: the replica validates, then *becomes* that server with ``exec``.

vLLM and llama.cpp already speak OpenAI's API with ``/health`` and ``/metrics``; wrapping them in our aiohttp
layer would add a hop, a second tokenizer and a second place for bugs, and would hide their own metrics. So
for these engines ``skyfabric replica`` only does what a fleet supervisor cannot do generically: check that
the engine is installed and the model is in a format it reads, translate the replica's options into the
engine's flags, and then ``os.execvpe`` the engine's server. The process the supervisor started keeps its
PID, so its SIGTERM reaches the engine directly and its exit code is the engine's.

The interface is one function per engine, ``build(spec) -> ServerCommand``, registered by name. It must not
start anything: it either returns the command or raises :class:`EngineUnavailable` with a message written
for the operator who reads the supervisor's log (what is missing and how to get it).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from skyfabric.engine.registry import SERVER_ENGINES, resolve

log = logging.getLogger("skyfabric.replica")

#: Exit code of ``skyfabric replica`` when the chosen engine (or device backend) is not installed or cannot
#: read the model. Distinct from a crash (1) and a usage error (2): restarting will not help.
EXIT_ENGINE_UNAVAILABLE = 3


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (not installed, wrong model format); the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """What the replica was asked to serve, in the replica's own terms (engines translate to their flags).

    ``executable`` is the engine-specific override (``--vllm-python``, ``--llama-server``); ``extra_args``
    are passed through verbatim (``--engine-arg``) for the flags we do not model.
    """

    model_dir: Path
    host: str
    port: int
    served_model_name: str
    max_num_seqs: int = 32
    max_model_len: int | None = None
    dtype: str = "auto"
    threads: int | None = None
    seed: int | None = None
    device: str | None = None
    kv_cache_mib: int | None = None
    executable: str | None = None
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerCommand:
    """A program to exec: argv (``argv[0]`` is looked up on PATH) and the variables to add to the env."""

    argv: list[str]
    env: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """The command as a shell line (for the log), with the env additions in front."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


ServerBuilder = Callable[[ServerSpec], ServerCommand]

#: Server engines registered at run time by plug-ins; the built-in ones are in ``registry.SERVER_ENGINES``.
_SERVERS: dict[str, ServerBuilder] = {}


def register_server_engine(name: str, build: ServerBuilder) -> None:
    """Make an exec'd engine selectable with ``--engine NAME`` (for engines that are not built in)."""
    _SERVERS[name] = build


def server_engine_names() -> list[str]:
    """Names of the engines that run as their own server (nothing is imported to list them)."""
    return sorted(set(SERVER_ENGINES) | set(_SERVERS))


def server_command(name: str, spec: ServerSpec) -> ServerCommand:
    """The command serving ``spec`` with engine ``name``; raises :class:`EngineUnavailable` if it can't."""
    build = _SERVERS.get(name)
    if build is None:
        if name not in SERVER_ENGINES:
            known = ", ".join(server_engine_names())
            raise ValueError(f"unknown server engine {name!r}; available: {known}")
        build = resolve(SERVER_ENGINES[name])
    return build(spec)


def exec_server(command: ServerCommand) -> NoReturn:
    """Replace this process with the engine's server (never returns; raises OSError if exec fails)."""
    log.info("exec: %s", command.describe())
    logging.shutdown()  # flush our handlers: nothing of this process survives the exec
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ)
    env.update(command.env)
    os.execvpe(command.argv[0], command.argv, env)

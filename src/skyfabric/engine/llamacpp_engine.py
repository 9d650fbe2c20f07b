"""``skyfabric replica --engine llama-cpp``: the replica process becomes llama.cpp's ``llama-server``.

Why: llama.cpp runs quantized GGUF models on anything (x86, ARM, Apple Metal, Vulkan, CUDA, ROCm) with one
static binary, and ``llama-server`` already speaks the OpenAI API with ``/health`` (503 while loading) and,
with ``--metrics``, Prometheus ``/metrics``. The replica finds the binary, resolves the GGUF file, maps its
options to llama-server flags and execs it.

llama.cpp reads GGUF only. A Hugging Face safetensors directory (what ``skyfabric grow`` writes) must be
converted first with llama.cpp's ``convert_hf_to_gguf.py``; the error says exactly how.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from skyfabric.engine.external import EngineUnavailable, ServerCommand, ServerSpec

#: Environment variable naming the llama-server binary (else ``llama-server`` on PATH).
LLAMA_SERVER_ENV = "SKYFABRIC_LLAMA_SERVER"
LLAMA_SERVER_BINARY = "llama-server"


def find_llama_server(explicit: str | None = None) -> str:
    """Path of ``llama-server``: ``explicit`` (or ``$SKYFABRIC_LLAMA_SERVER``), else the one on PATH."""
    explicit = explicit or os.environ.get(LLAMA_SERVER_ENV) or None
    found = shutil.which(explicit or LLAMA_SERVER_BINARY)
    if found is None:
        if explicit:
            raise EngineUnavailable(f"--engine llama-cpp: {explicit!r} does not exist or is not executable")
        raise EngineUnavailable(
            "--engine llama-cpp: no llama-server binary on PATH; install llama.cpp (a release from "
            "github.com/ggml-org/llama.cpp, `brew install llama.cpp`, or build it with cmake) and put "
            f"llama-server on PATH, or pass --llama-server PATH (or set ${LLAMA_SERVER_ENV})"
        )
    return found


def resolve_gguf(model: Path) -> Path:
    """The GGUF file to serve: ``model`` itself, or the only ``*.gguf`` in the directory ``model``."""
    if model.is_file():
        if model.suffix.lower() != ".gguf":
            raise EngineUnavailable(f"--engine llama-cpp: {model} is not a .gguf file")
        return model
    if not model.is_dir():
        raise EngineUnavailable(f"--engine llama-cpp: {model} does not exist")
    ggufs = sorted(model.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise EngineUnavailable(
            f"--engine llama-cpp: {model} holds several GGUF files ({names}); pass one as --model-dir FILE"
        )
    if (model / "config.json").is_file():
        raise EngineUnavailable(
            f"--engine llama-cpp: {model} is a Hugging Face (safetensors) checkpoint, and llama.cpp reads "
            "GGUF only. Convert it with llama.cpp's converter, then pass the .gguf file (or its directory):\n"
            f"    python convert_hf_to_gguf.py {model} --outtype f16 --outfile {model}/model-f16.gguf\n"
            "(convert_hf_to_gguf.py is at the root of github.com/ggml-org/llama.cpp; it needs that repo's "
            "requirements: pip install -r requirements/requirements-convert_hf_to_gguf.txt)"
        )
    raise EngineUnavailable(f"--engine llama-cpp: no .gguf file in {model}")


def build_llamacpp_command(spec: ServerSpec) -> ServerCommand:
    """``llama-server -m MODEL.gguf --host H --port P --alias NAME --parallel N --metrics ...``.

    ``--parallel`` is the replica's ``max_num_seqs`` (llama.cpp's batch slots). llama-server splits
    ``--ctx-size`` between slots unless its KV cache is unified, so with ``max_model_len`` set we ask for
    ``max_model_len`` × slots; without it llama-server's own default applies.
    """
    gguf = resolve_gguf(spec.model_dir)
    binary = find_llama_server(spec.executable)
    argv = [
        binary,
        "-m", str(gguf),
        "--host", spec.host,
        "--port", str(spec.port),
        "--alias", spec.served_model_name,
        "--parallel", str(spec.max_num_seqs),
        "--metrics",
    ]  # fmt: skip
    if spec.max_model_len is not None:
        argv += ["--ctx-size", str(spec.max_model_len * spec.max_num_seqs)]
    if spec.threads is not None:
        argv += ["--threads", str(spec.threads)]
    if spec.seed is not None:
        argv += ["--seed", str(spec.seed)]
    argv += spec.extra_args
    return ServerCommand(argv)

"""``skyfabric replica --engine vllm|llama-cpp``: validation errors, and exec into the engine's own server.

No real vLLM or llama.cpp is needed: a fake ``vllm`` package (its ``vllm.entrypoints.openai.api_server``
module) and a fake ``llama-server`` script record their argv and PID and answer ``/health`` and
``/v1/models`` over real HTTP. The PID check is what proves the replica *exec'd* the server (the process the
supervisor started is the server) rather than spawning a child.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from skyfabric.engine import DEFAULT_MODEL_DIR
from skyfabric.engine.devices import resolve_device
from skyfabric.engine.external import (
    EXIT_ENGINE_UNAVAILABLE,
    EngineUnavailable,
    ServerSpec,
    server_command,
    server_engine_names,
)
from skyfabric.engine.replica import replica_command

from .conftest import free_port

pytestmark = pytest.mark.timeout(60)

SRC = Path(__file__).resolve().parents[2] / "src"
HAS_VLLM = importlib.util.find_spec("vllm") is not None

#: A tiny HTTP server standing in for vLLM's / llama-server's: records how it was started, serves /health.
FAKE_SERVER = textwrap.dedent(
    """
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    args = sys.argv[1:]

    def flag(*names):
        for name in names:
            if name in args:
                return args[args.index(name) + 1]
        return None

    record = {
        "argv": args,
        "pid": os.getpid(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "SKYFABRIC_"))},
    }
    with open(os.environ["FAKE_ENGINE_RECORD"], "w") as f:
        json.dump(record, f)
    name = flag("--served-model-name", "--alias") or "fake"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                body = b"{}"
            elif self.path == "/v1/models":
                body = json.dumps({"object": "list", "data": [{"id": name, "object": "model"}]}).encode()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    ThreadingHTTPServer((flag("--host") or "127.0.0.1", int(flag("--port"))), Handler).serve_forever()
    """
)


@pytest.fixture()
def fake_vllm_pkg(tmp_path: Path) -> Path:
    """A directory that, on PYTHONPATH, makes ``vllm.entrypoints.openai.api_server`` the fake server."""
    root = tmp_path / "fakevllm"
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for init in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (init / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_SERVER)
    return root


@pytest.fixture()
def fake_llama_server(tmp_path: Path) -> Path:
    """A ``llama-server`` executable (a Python script) in a directory of its own, for PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "llama-server"
    script.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    script.chmod(0o755)
    return script


@pytest.fixture()
def gguf_dir(tmp_path: Path) -> Path:
    """A directory holding one (fake) GGUF file: the header magic is all the replica looks at (nothing)."""
    out = tmp_path / "gguf"
    out.mkdir()
    (out / "tiny-q8_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    return out


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("SKYFABRIC_VLLM_PYTHON", "SKYFABRIC_LLAMA_SERVER")
    }
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _replica_argv(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "skyfabric.engine.replica", "--port", str(port), *extra]


def _run_until_healthy(argv: list[str], env: dict[str, str], record: Path, log: Path) -> dict[str, Any]:
    """Start the replica, wait until the exec'd fake answers /health, check /v1/models, stop it."""
    port = int(argv[argv.index("--port") + 1])
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"replica exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no /health in 30 s:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        with urllib.request.urlopen(base + "/v1/models", timeout=5) as resp:
            models = json.loads(resp.read())
        result: dict[str, Any] = json.loads(record.read_text())
        result["models"] = [m["id"] for m in models["data"]]
        result["replica_pid"] = proc.pid
        result["log"] = log.read_text()
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------ vLLM


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed in this Python")
def test_vllm_not_installed_is_a_clear_error_and_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        _replica_argv(free_port(), "--engine", "vllm", "--model-dir", str(DEFAULT_MODEL_DIR)),
        env=_env(),
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == EXIT_ENGINE_UNAVAILABLE
    err = proc.stderr.decode()
    assert "the vllm package is not installed in this Python" in err
    assert "--vllm-python" in err and "SKYFABRIC_VLLM_PYTHON" in err
    assert "Traceback" not in err


def test_vllm_python_without_vllm_or_missing(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--engine", "vllm", "--port", "8000", "--model-dir", str(DEFAULT_MODEL_DIR)]
    if not HAS_VLLM:
        result = runner.invoke(replica_command, [*base, "--vllm-python", sys.executable])
        assert result.exit_code == EXIT_ENGINE_UNAVAILABLE
        assert f"the vllm package is not installed in {sys.executable}" in result.output
    result = runner.invoke(replica_command, [*base], env={"SKYFABRIC_VLLM_PYTHON": str(tmp_path / "nope")})
    assert result.exit_code == EXIT_ENGINE_UNAVAILABLE
    assert "does not exist or is not executable" in result.output


def test_vllm_needs_a_hf_checkpoint_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        replica_command, ["--engine", "vllm", "--port", "8000", "--model-dir", str(tmp_path)]
    )
    assert result.exit_code == EXIT_ENGINE_UNAVAILABLE
    assert "not a Hugging Face checkpoint directory" in result.output


def test_vllm_execs_the_python_given_by_env(tmp_path: Path, fake_vllm_pkg: Path) -> None:
    """$SKYFABRIC_VLLM_PYTHON names a Python that has vLLM (here: a wrapper adding the fake to its path)."""
    fake_python = tmp_path / "python-with-vllm"
    fake_python.write_text(f'#!/bin/sh\nPYTHONPATH="{fake_vllm_pkg}" exec "{sys.executable}" "$@"\n')
    fake_python.chmod(0o755)
    record = tmp_path / "record.json"
    port = free_port()
    env = _env(SKYFABRIC_VLLM_PYTHON=str(fake_python), FAKE_ENGINE_RECORD=str(record))
    argv = _replica_argv(
        port, "--engine", "vllm", "--model-dir", str(DEFAULT_MODEL_DIR), "--served-model-name", "code",
    )  # fmt: skip
    seen = _run_until_healthy(argv, env, record, tmp_path / "replica.log")
    assert seen["pid"] == seen["replica_pid"], "the replica must exec vLLM, not spawn it"
    assert seen["argv"] == [
        "--model", str(DEFAULT_MODEL_DIR),
        "--served-model-name", "code",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-num-seqs", "32",
        "--dtype", "auto",
    ]  # fmt: skip
    assert seen["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert seen["models"] == ["code"]
    assert "exec: VLLM_CPU_KVCACHE_SPACE=1 " in seen["log"]
    assert "-m vllm.entrypoints.openai.api_server" in seen["log"]


def test_vllm_importable_here_and_options_translated(tmp_path: Path, fake_vllm_pkg: Path) -> None:
    """With vllm importable by the replica's own Python, it runs ``sys.executable -m vllm...``."""
    record = tmp_path / "record.json"
    port = free_port()
    env = _env(FAKE_ENGINE_RECORD=str(record))
    env["PYTHONPATH"] = str(fake_vllm_pkg) + os.pathsep + env["PYTHONPATH"]
    argv = _replica_argv(
        port, "--engine", "vllm", "--model-dir", str(DEFAULT_MODEL_DIR), "--host", "127.0.0.1",
        "--max-num-seqs", "16", "--max-model-len", "256", "--dtype", "bfloat16", "--seed", "7",
        "--kv-cache-mib", "1536", "--engine-arg=--enforce-eager",
    )  # fmt: skip
    seen = _run_until_healthy(argv, env, record, tmp_path / "replica.log")
    assert seen["pid"] == seen["replica_pid"]
    args = seen["argv"]
    assert args[args.index("--max-num-seqs") + 1] == "16"
    assert args[args.index("--max-model-len") + 1] == "256"
    assert args[args.index("--dtype") + 1] == "bfloat16"
    assert args[args.index("--seed") + 1] == "7"
    assert args[args.index("--served-model-name") + 1] == DEFAULT_MODEL_DIR.name
    assert args[-1] == "--enforce-eager"
    assert seen["env"]["VLLM_CPU_KVCACHE_SPACE"] == "2"  # 1536 MiB rounded up to whole GiB
    assert seen["models"] == [DEFAULT_MODEL_DIR.name]


# ------------------------------------------------------------------------------------------------ llama.cpp


def test_llamacpp_execs_llama_server_on_path(tmp_path: Path, fake_llama_server: Path, gguf_dir: Path) -> None:
    record = tmp_path / "record.json"
    port = free_port()
    env = _env(FAKE_ENGINE_RECORD=str(record))
    env["PATH"] = str(fake_llama_server.parent) + os.pathsep + env["PATH"]
    argv = _replica_argv(
        port, "--engine", "llama-cpp", "--model-dir", str(gguf_dir), "--served-model-name", "code",
        "--max-num-seqs", "4", "--max-model-len", "512", "--threads", "2",
    )  # fmt: skip
    seen = _run_until_healthy(argv, env, record, tmp_path / "replica.log")
    assert seen["pid"] == seen["replica_pid"], "the replica must exec llama-server, not spawn it"
    assert seen["argv"] == [
        "-m", str(gguf_dir / "tiny-q8_0.gguf"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--alias", "code",
        "--parallel", "4",
        "--metrics",
        "--ctx-size", "2048",
        "--threads", "2",
    ]  # fmt: skip
    assert seen["models"] == ["code"]


def test_llamacpp_explicit_binary_and_gguf_file(
    tmp_path: Path, fake_llama_server: Path, gguf_dir: Path
) -> None:
    record = tmp_path / "record.json"
    port = free_port()
    gguf = gguf_dir / "tiny-q8_0.gguf"
    env = _env(FAKE_ENGINE_RECORD=str(record))
    argv = _replica_argv(
        port, "--engine", "llama-cpp", "--llama-server", str(fake_llama_server), "--model-dir", str(gguf),
    )  # fmt: skip
    seen = _run_until_healthy(argv, env, record, tmp_path / "replica.log")
    assert seen["pid"] == seen["replica_pid"]
    assert seen["argv"][:2] == ["-m", str(gguf)]
    assert "--threads" not in seen["argv"]  # llama.cpp picks its own thread count unless asked
    assert "--ctx-size" not in seen["argv"]
    assert seen["models"] == [gguf.stem]


def test_llamacpp_without_binary_is_a_clear_error(tmp_path: Path, gguf_dir: Path) -> None:
    proc = subprocess.run(
        _replica_argv(free_port(), "--engine", "llama-cpp", "--model-dir", str(gguf_dir)),
        env=_env(PATH=str(tmp_path)),  # nothing on PATH
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == EXIT_ENGINE_UNAVAILABLE
    err = proc.stderr.decode()
    assert "no llama-server binary on PATH" in err and "--llama-server" in err
    assert "Traceback" not in err


def test_llamacpp_refuses_hf_checkpoint_with_conversion_hint(fake_llama_server: Path) -> None:
    result = CliRunner().invoke(
        replica_command,
        ["--engine", "llama-cpp", "--llama-server", str(fake_llama_server), "--port", "8000"],
    )
    assert result.exit_code == EXIT_ENGINE_UNAVAILABLE
    assert "Hugging Face (safetensors) checkpoint" in result.output
    assert f"convert_hf_to_gguf.py {DEFAULT_MODEL_DIR} --outtype f16" in result.output


def test_llamacpp_several_ggufs_must_be_chosen(
    tmp_path: Path, fake_llama_server: Path, gguf_dir: Path
) -> None:
    (gguf_dir / "tiny-f16.gguf").write_bytes(b"GGUF")
    spec = ServerSpec(
        model_dir=gguf_dir, host="h", port=1, served_model_name="m", executable=str(fake_llama_server)
    )
    with pytest.raises(EngineUnavailable, match="several GGUF files"):
        server_command("llama-cpp", spec)


# ------------------------------------------------------------------------------------------------ plumbing


def test_engine_choices_env_default_and_engine_arg_only_for_server_engines() -> None:
    assert server_engine_names() == ["llama-cpp", "vllm"]
    runner = CliRunner()
    result = runner.invoke(replica_command, ["--help"])
    assert "[auto|native|transformers|llama-cpp|vllm]" in result.output
    result = runner.invoke(replica_command, ["--port", "8000", "--engine-arg", "--x"])
    assert result.exit_code == 2 and "--engine-arg is for engines that run their own server" in result.output
    result = runner.invoke(replica_command, ["--engine", "sglang", "--port", "8000"])
    assert result.exit_code == 2
    # `skyfabric up` passes no --engine: the variable picks the engine for every local replica.
    result = runner.invoke(
        replica_command,
        ["--port", "8000"],
        env={"SKYFABRIC_ENGINE": "llama-cpp", "SKYFABRIC_LLAMA_SERVER": "/nonexistent/llama-server"},
    )
    assert result.exit_code == EXIT_ENGINE_UNAVAILABLE
    assert "--engine llama-cpp" in result.output


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed")
def test_device_xla_without_torch_xla_is_a_clear_error() -> None:
    with pytest.raises(EngineUnavailable, match="torch_xla package is not installed"):
        resolve_device("xla")
    result = CliRunner().invoke(replica_command, ["--port", "8000", "--device", "xla"])
    assert result.exit_code == EXIT_ENGINE_UNAVAILABLE
    assert "torch-xla" in result.output


@pytest.mark.skipif(
    importlib.util.find_spec("torch_neuronx") is not None, reason="torch-neuronx is installed"
)
def test_device_neuron_without_torch_neuronx_is_a_clear_error() -> None:
    with pytest.raises(EngineUnavailable, match="torch_neuronx package is not installed"):
        resolve_device("neuron")


def test_device_cuda_without_gpu_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
        return
    with pytest.raises(EngineUnavailable, match="sees no cuda device"):
        resolve_device("cuda:0")
    assert resolve_device(None) is None
    assert resolve_device("cpu") == "cpu"

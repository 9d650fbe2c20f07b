"""Where the built-in transformers engine runs: ``--device`` checked up front, with a message that helps.

The built-in engine is plain PyTorch, so the same model code runs on any device torch has a backend for:
CPU, CUDA/ROCm (``cuda``), Apple (``mps``), Google TPU through torch_xla (``xla``) and AWS Trainium/Inferentia
through torch-neuronx (``neuron``, which exposes NeuronCores as XLA devices). Without a check, asking for a
backend that is not installed fails deep inside ``model.to()`` with an error about dispatch keys; an operator
should instead read which package is missing. Importing the backend here is also what registers its device
with torch, so it must happen in the replica process before the model loads.

Only CPU (and CUDA, where present) is tested in CI; XLA and Neuron are the documented path, exercised only
where that hardware exists.
"""

from __future__ import annotations

import importlib
import importlib.util

from skyfabric.engine.external import EngineUnavailable

#: ``--device`` value → (module that provides the backend, pip requirement that installs it).
BACKENDS: dict[str, tuple[str, str]] = {
    "xla": ("torch_xla", "torch-xla (TPU: pip install 'torch-xla[tpu]' matching your torch version)"),
    "neuron": ("torch_neuronx", "torch-neuronx (from AWS's Neuron pip repository; see the Neuron SDK docs)"),
}


def resolve_device(device: str | None) -> str | None:
    """Validate ``--device`` and return the torch device string the engine should use (None = auto).

    Raises :class:`EngineUnavailable` when the backend package or the hardware is missing.
    """
    if device is None or device == "cpu":
        return device
    kind = device.split(":", 1)[0]
    if kind in BACKENDS:
        module, requirement = BACKENDS[kind]
        if importlib.util.find_spec(module) is None:
            raise EngineUnavailable(
                f"--device {device}: the {module} package is not installed in this Python; install "
                f"{requirement}, or use --device cpu/cuda (see docs/engines.md)"
            )
        try:
            importlib.import_module(module)  # registers the XLA/Neuron device with torch
        except Exception as exc:  # a broken install or no accelerator: say so instead of a dispatch error
            raise EngineUnavailable(f"--device {device}: importing {module} failed: {exc}") from exc
        # torch-neuronx drives NeuronCores through torch_xla: the torch device is an XLA one.
        return "xla" if kind == "neuron" else device
    if kind in ("cuda", "mps"):
        import torch

        available = torch.cuda.is_available() if kind == "cuda" else torch.backends.mps.is_available()
        if not available:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise EngineUnavailable(
                f"--device {device}: torch {torch.__version__} ({build}) sees no {kind} device here; "
                "use --device cpu, or install a torch build for this accelerator"
            )
    return device

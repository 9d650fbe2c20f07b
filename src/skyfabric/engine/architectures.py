"""Which checkpoints the native engine runs, decided from config.json alone (no torch import).

``--engine auto`` (the default) serves a checkpoint with the native engine when it can and with the
transformers engine otherwise, so any local Hugging Face decoder still loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

#: ``config.model_type`` values the native forward pass computes exactly like transformers does.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral"})


def unsupported_reason(config: Any) -> str | None:
    """Why the native engine cannot run this config (an HF config or a namespace), or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        return f"model_type {model_type!r} (the native engine runs {supported})"
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        return "Qwen2 with use_sliding_window"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
        return "dynamic RoPE scaling (its frequencies depend on each sequence's length)"
    return None


def native_unsupported_reason(model_dir: str | os.PathLike[str]) -> str | None:
    """:func:`unsupported_reason` for a checkpoint directory (``config.json`` missing or bad: a reason)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"cannot read config.json ({exc})"
    if not isinstance(config, dict):
        return "config.json is not an object"
    return unsupported_reason(SimpleNamespace(**config))


def pick_engine(model_dir: str | os.PathLike[str]) -> str:
    """``native`` when it can run the checkpoint, else ``transformers``."""
    return "native" if native_unsupported_reason(model_dir) is None else "transformers"

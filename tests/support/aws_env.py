"""A clean AWS environment for tests: none of the host's AWS variables or files, no metadata service."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.bedrock_standin import ACCESS_KEY, SECRET_KEY


def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, standin_keys: bool = True) -> Path:
    """Clear every ``AWS_*`` variable, point the config and credentials files into ``tmp_path``, turn off
    the instance metadata service; with ``standin_keys``, the Bedrock stand-in's keys in the environment.
    Returns ``tmp_path`` (where a test may write config or credentials files)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if standin_keys:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    return tmp_path

"""An ``engine: bedrock`` pool's ``bedrock:`` section: which region, which API, which credential profile.

Credentials are never here: they come from the standard AWS chain (environment, shared credentials and
config files with ``profile``, web identity, SSO, container and instance roles), resolved by botocore in
the adapter (``protocols/backends/bedrock_auth.py``). The section refuses any other key, so a key pasted
into the file is a load error, not a secret at rest.

A pool without ``endpoints`` reaches its region's public runtime endpoint,
``https://bedrock-runtime.{region}.amazonaws.com``; ``endpoints`` may name another (a VPC endpoint, a test
stand-in).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: An AWS region name (``us-east-1``, ``eu-central-2``, ``us-gov-west-1``).
AwsRegion = Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")]


class BedrockSettings(BaseModel):
    """An Amazon Bedrock pool's own settings (see the module's doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    region: AwsRegion = Field(description="the AWS region requests are signed for and, by default, sent to")
    api: Literal["converse", "invoke"] = Field(
        "converse",
        description="`converse`: Converse/ConverseStream, any model; `invoke`: "
        "InvokeModel[WithResponseStream] with Anthropic's Messages body (Claude models only)",
    )
    profile: str | None = Field(
        None, min_length=1, description="the shared-config profile of the credentials (else AWS_PROFILE)"
    )
    inference_profile: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="model id sent in the path instead of `upstream_model`: a cross-region inference "
        "profile (`us.anthropic.claude-...`) or an inference profile ARN; `upstream_model` stays the "
        "foundation model",
    )


def default_endpoint(data: Any) -> Any:
    """A raw pool (before validation) of engine ``bedrock`` with no ``endpoints``, given its region's."""
    if isinstance(data, dict) and data.get("engine") == "bedrock" and not data.get("endpoints"):
        section = data.get("bedrock")
        if not isinstance(section, dict):
            check_pool("bedrock", None)  # said before the endpoint check, which would blame `endpoints`
        region = section.get("region") if isinstance(section, dict) else None
        if isinstance(region, str):
            return {**data, "endpoints": [f"https://bedrock-runtime.{region}.amazonaws.com"]}
    return data


def check_pool(engine: str, section: BedrockSettings | None) -> None:
    """A ``bedrock`` section on, and only on, an ``engine: bedrock`` pool."""
    if (engine == "bedrock") != (section is not None):
        raise ValueError("engine 'bedrock' needs a `bedrock` section (region, api), and only it takes one")

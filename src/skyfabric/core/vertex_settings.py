"""A Vertex AI pool's own settings (the fleet file's ``vertex:`` section of an ``engine: vertex`` pool).

Vertex names a model by URL, not in the body: ``{endpoint}/projects/{project}/locations/{location}/
publishers/{publisher}/models/{model}:{method}``. The pool says which project, region and publisher, and
where the OAuth credentials come from; the adapter (``protocols/backends/vertex.py``) builds the rest.
Credentials are never written in the fleet file: a path to a credentials JSON, the name of an environment
variable that holds that path, or (neither) Google's Application Default Credentials chain.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The Google Cloud scope every Vertex AI call needs.
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class VertexSettings(BaseModel):
    """Where a Vertex AI pool's models live and how the gateway proves who it is there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = Field(
        min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$", description="Google Cloud project id"
    )
    location: str = Field(
        min_length=1,
        max_length=40,
        pattern=r"^[a-z0-9-]+$",
        description="region (us-east5, europe-west1, ...) or `global`; sets the default endpoint",
    )
    publisher: Literal["anthropic", "google"] = Field(
        description="whose models: Claude (rawPredict, Anthropic's body and events) or Gemini "
        "(generateContent)"
    )
    credentials_file: str | None = Field(
        None,
        min_length=1,
        description="path to a credentials JSON: a service account key, an authorized user, or an external "
        "account (workload identity federation)",
    )
    credentials_env: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the path of such a credentials JSON",
    )

    @model_validator(mode="after")
    def _one_credential_source(self) -> VertexSettings:
        if self.credentials_file is not None and self.credentials_env is not None:
            raise ValueError("give `credentials_file` or `credentials_env`, not both")
        return self

    @property
    def credential_key(self) -> str:
        """Which credential this pool uses (pools sharing one share its token): ``file:``, ``env:``, ADC."""
        if self.credentials_file is not None:
            return f"file:{self.credentials_file}"
        if self.credentials_env is not None:
            return f"env:{self.credentials_env}"
        return "default"


def default_endpoint(location: str) -> str:
    """Vertex AI's base URL for ``location`` (the ``global`` location has no regional host)."""
    if location == "global":
        return "https://aiplatform.googleapis.com/v1"
    return f"https://{location}-aiplatform.googleapis.com/v1"


def with_default_endpoint(data: Any) -> Any:
    """A pool's raw fields with Vertex's regional endpoint filled in when it names none (nor discovery).

    Runs before validation so the pool's ``endpoints`` rule (a remote engine needs one) holds as written;
    tests and private endpoints (Private Service Connect) give their own ``endpoints``.
    """
    if not isinstance(data, dict) or data.get("engine") != "vertex":
        return data
    if data.get("endpoints") or data.get("discovery") is not None:
        return data
    section = data.get("vertex")
    location = section.get("location") if isinstance(section, dict) else None
    if not isinstance(location, str) or not location:
        return data
    return {**data, "endpoints": [default_endpoint(location)]}

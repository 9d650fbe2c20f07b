"""An ``engine: azure-openai`` pool's ``azure:`` section: which deployment, which API route, which credential.

An Azure OpenAI pool's endpoint URL is its resource, ``https://{resource}.openai.azure.com``. Two routes
reach a deployment there, chosen by ``api_version``:

* ``v1`` (default): the GA v1 API, ``/openai/v1/chat/completions``, no ``api-version`` query; the body's
  ``model`` names the deployment.
* a dated version (``2024-10-21``, ``2025-01-01-preview``, ...): the deployment route,
  ``/openai/deployments/{deployment}/chat/completions?api-version=...``; the deployment is in the path and
  the body's ``model`` is ignored by Azure.

Credentials come from the environment only, never from the file itself: ``auth: api-key`` sends the pool's
``api_key_env`` as the ``api-key`` header; ``auth: entra`` sends a Microsoft Entra ID bearer token obtained
with the OAuth client-credentials grant for ``client_id`` in ``tenant_id``, proved by the secret in
``client_secret_env`` or, for workload identity (AKS), by the federated token in ``federated_token_file``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: ``v1`` or a dated API version (``YYYY-MM-DD`` with an optional ``-preview``).
API_VERSION = re.compile(r"^(v1|\d{4}-\d{2}-\d{2}(-preview)?)$")

#: Where Entra ID issues tokens (the public cloud; sovereign clouds have their own authority host).
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"


class AzureOpenAISettings(BaseModel):
    """An Azure OpenAI pool's own settings (see the module's doc for the routes and credentials)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
        description="the deployment name; default: the pool's upstream_model (else its model)",
    )
    api_version: str = Field(
        "v1", description="`v1` (the /openai/v1 route) or a dated version (the deployment route)"
    )
    auth: Literal["api-key", "entra"] = Field(
        "api-key", description="`api-key`: the pool's api_key_env; `entra`: an Entra ID bearer token"
    )
    tenant_id: str | None = Field(None, description="entra: the directory (tenant) id")
    client_id: str | None = Field(None, description="entra: the application (client) id")
    client_secret_env: str | None = Field(
        None, description="entra: variable holding the client secret (default AZURE_CLIENT_SECRET)"
    )
    federated_token_file: str | None = Field(
        None, description="entra: a federated token file (workload identity) used instead of a secret"
    )
    authority: str = Field(DEFAULT_AUTHORITY, description="entra: the authority host that issues tokens")

    @model_validator(mode="after")
    def _consistent(self) -> AzureOpenAISettings:
        if not API_VERSION.match(self.api_version):
            raise ValueError(
                f"api_version {self.api_version!r} must be 'v1' or a dated version such as '2024-10-21'"
            )
        entra_only = {"tenant_id", "client_id", "client_secret_env", "federated_token_file", "authority"}
        if self.auth == "api-key":
            given = entra_only & self.model_fields_set
            if given:
                raise ValueError(f"auth 'api-key' takes no {', '.join(sorted(given))} (they are for entra)")
        else:
            if not self.tenant_id or not self.client_id:
                raise ValueError("auth 'entra' needs tenant_id and client_id")
            if self.client_secret_env and self.federated_token_file:
                raise ValueError("give client_secret_env or federated_token_file, not both")
            loopback = self.authority.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]"))
            if not self.authority.startswith("https://") and not loopback:
                # the client secret travels in that request: never in clear over a network
                raise ValueError(f"authority {self.authority!r} must be an https:// URL")
        return self

    @property
    def secret_env(self) -> str:
        """The environment variable that holds the client secret (Azure's SDKs' name by default)."""
        return self.client_secret_env or "AZURE_CLIENT_SECRET"

    @property
    def deployment_route(self) -> bool:
        """Whether requests go to ``/openai/deployments/{deployment}/...?api-version=`` (a dated version)."""
        return self.api_version != "v1"


def check_pool(engine: str, settings: AzureOpenAISettings | None, api_key_env: str | None) -> None:
    """Raise ValueError when a pool's ``azure`` section does not fit its engine or its credentials."""
    if engine != "azure-openai":
        if settings is not None:
            raise ValueError(f"`azure` is for engine 'azure-openai', not {engine!r}")
        return
    auth = settings.auth if settings is not None else "api-key"
    if auth == "api-key" and not api_key_env:
        raise ValueError("engine 'azure-openai' with auth 'api-key' needs api_key_env (the resource's key)")
    if auth == "entra" and api_key_env:
        raise ValueError("auth 'entra' sends a bearer token: api_key_env would be ignored, remove it")

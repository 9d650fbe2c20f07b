"""Entra ID tokens: the refresh schedule (a fake clock), the grant against a token endpoint that verifies it
(secret and federated assertion), failures that name no secret, and the adapter's headers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from skyfabric.core.endpoints import pool_endpoint
from skyfabric.core.fleet import parse_fleet
from skyfabric.core.fleet_azure import AzureOpenAISettings
from skyfabric.protocols.backends.azure import AzureOpenAIBackend
from skyfabric.protocols.backends.azure_entra import (
    EntraToken,
    TokenError,
    backoff,
    redact,
    refresh_delay,
    usable_for,
)
from tests.support.azure_standin import Issuer


@pytest.fixture
def issuer() -> object:
    up = Issuer(token_lifetime=3600).start()
    yield up
    up.stop()


def settings(issuer: Issuer, **more: str) -> AzureOpenAISettings:
    return AzureOpenAISettings(
        auth="entra",
        tenant_id=issuer.tenant,
        client_id=issuer.client_id,
        authority=issuer.url,
        **more,  # type: ignore[arg-type]
    )


def test_the_schedule() -> None:
    assert refresh_delay(3599) == 3299  # five minutes before expiry, as Azure's SDKs refresh
    assert refresh_delay(4) == 2  # a short-lived token: halfway
    assert usable_for(3600) == 3570 and usable_for(2) == pytest.approx(1.8)
    assert [backoff(n) for n in (1, 2, 3, 6, 20)] == [1, 2, 4, 30, 30]
    assert redact("a s3cret b s3cret", "s3cret", None, "") == "a [redacted] b [redacted]"


def test_a_token_is_used_until_shortly_before_expiry(issuer: Issuer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_CLIENT_SECRET", issuer.client_secret)
    now = [1000.0]
    source = EntraToken(settings(issuer), clock=lambda: now[0])
    assert source.refresh_once() == 3300
    header = source.header()
    assert header is not None and header.removeprefix(b"Bearer ").decode() in issuer.issued
    now[0] += 3569
    assert source.header() == header
    now[0] += 2  # past its usable life: never sent, even if the refresher is late
    source._thread = object()  # type: ignore[assignment]  # (no refresher in this test)
    assert source.header() is None
    assert issuer.grants[-1][1] == "secret"


def test_federated_assertion_is_read_at_each_fetch(issuer: Issuer, tmp_path: Path) -> None:
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(issuer.assertion + "\n")
    source = EntraToken(settings(issuer, federated_token_file=str(token_file)))
    token, lifetime = source.fetch()
    assert token in issuer.issued and lifetime == 3600 and issuer.grants[-1][1] == "assertion"
    token_file.write_text("rotated-but-wrong")
    with pytest.raises(TokenError) as caught:
        source.fetch()
    assert "invalid_client" in str(caught.value) and "rotated-but-wrong" not in str(caught.value)
    token_file.unlink()
    with pytest.raises(TokenError, match="cannot read federated_token_file"):
        source.fetch()


def test_failures_name_no_secret(issuer: Issuer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRONG_SECRET", "entra-secret-WRONG-42")
    with pytest.raises(TokenError) as caught:
        EntraToken(settings(issuer, client_secret_env="WRONG_SECRET")).fetch()
    assert "AADSTS7000215" in str(caught.value) and "entra-secret-WRONG-42" not in str(caught.value)
    monkeypatch.delenv("AZURE_CLIENT_SECRET", raising=False)
    with pytest.raises(TokenError, match="AZURE_CLIENT_SECRET"):
        EntraToken(settings(issuer)).fetch()
    monkeypatch.setenv("AZURE_CLIENT_SECRET", issuer.client_secret)
    other = AzureOpenAISettings(
        auth="entra", tenant_id="nope", client_id=issuer.client_id, authority=issuer.url
    )
    with pytest.raises(TokenError, match="AADSTS90002"):
        EntraToken(other).fetch()
    gone = AzureOpenAISettings(
        auth="entra",
        tenant_id="t",
        client_id="c",
        authority="http://127.0.0.1:9",  # nothing listens
    )
    with pytest.raises(TokenError, match="unreachable") as unreachable:
        EntraToken(gone).fetch()
    assert issuer.client_secret not in str(unreachable.value)


def test_the_adapter_prepares_tokens_at_load_and_refreshes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = Issuer(token_lifetime=1.0).start()
    try:
        monkeypatch.setenv("MY_SECRET", issuer.client_secret)
        pool = {
            "name": "pool",
            "accelerator": "managed",
            "engine": "azure-openai",
            "model": "m",
            "endpoints": ["https://a.openai.azure.com", "https://b.openai.azure.com"],
            "azure": {
                "auth": "entra",
                "tenant_id": issuer.tenant,
                "client_id": issuer.client_id,
                "client_secret_env": "MY_SECRET",
                "authority": issuer.url,
            },
        }
        fleet = parse_fleet(
            {
                "models": [{"name": "m"}],
                "providers": [{"name": "az", "regions": [{"name": "r", "pools": [pool]}]}],
            }
        )
        spec = fleet.providers[0].regions[0].pools[0]
        endpoints = [pool_endpoint("az", "r", spec, i, url) for i, url in enumerate(spec.endpoints)]
        adapter = AzureOpenAIBackend()
        for ep in endpoints:
            adapter.prepare(ep)
        assert len(issuer.grants) == 1  # one credential, one token for both resources
        first = dict(adapter.auth(endpoints[0]))[b"authorization"]
        assert dict(adapter.auth(endpoints[1]))[b"authorization"] == first
        time.sleep(1.2)  # the refresher runs at half-life: a new token without any request
        assert len(issuer.grants) >= 2
        assert dict(adapter.auth(endpoints[0]))[b"authorization"] != first
        adapter.close()
    finally:
        issuer.stop()

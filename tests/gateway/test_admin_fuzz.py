"""A property-based fuzz of the admin API over real HTTP: whatever it is sent, it never answers 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.gateway_proc import GatewayProcess, fleet_file

ADMIN = "admin-credential-for-the-fuzz"
FIELDS = [
    "name", "team", "models", "rpm", "tpm", "max_concurrent", "budget", "budget_period", "expires_at",
    "expires_in", "failure_policy", "overlap_seconds", "key", "id",
]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    json_values,
    st.binary(max_size=64).map(lambda b: b),
)


@pytest.fixture(scope="module")
def admin_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, list[str]]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    fleet = fleet_file(
        tmp / "fleet.yaml",
        "http://127.0.0.1:9/v1",
        operations={"database": "keys.db", "admin_key_env": "SF_FUZZ"},
    )
    gw = GatewayProcess(fleet, tmp / "gw.log", {"SF_FUZZ": ADMIN})
    try:
        gw.wait_ready()
        with httpx.Client(base_url=gw.root, timeout=10) as http:
            made = http.post(
                "/admin/keys", json={"name": "seed"}, headers={"authorization": f"Bearer {ADMIN}"}
            )
            assert made.status_code == 201
            yield http, [made.json()["id"]]
    finally:
        gw.stop()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT"]),
    tail=st.lists(
        st.sampled_from(["", "rotate", "revoke", "keys", "..", "%00", "k" * 300, "ID"])
        | st.text(max_size=10),
        max_size=3,
    ),
    body=bodies,
    auth=st.sampled_from(["admin", "none", "wrong"]),
)
@pytest.mark.slow
def test_the_admin_api_never_answers_5xx(
    admin_gateway: tuple[httpx.Client, list[str]], method: str, tail: list[str], body: Any, auth: str
) -> None:
    http, ids = admin_gateway
    segments = [ids[0] if s == "ID" else s for s in tail]
    path = "/admin/keys" + "".join("/" + quote(s, safe=".%") for s in segments)
    headers = {"authorization": {"admin": f"Bearer {ADMIN}", "none": "", "wrong": "Bearer nope"}[auth]}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN/Infinity too
    answer = http.request(method, path, content=content, headers=headers)
    assert answer.status_code < 500, (method, path, content, answer.text)
    if answer.status_code >= 400:
        assert answer.json()["error"]["message"]
    if answer.status_code in (200, 201) and method == "POST" and path.endswith("/admin/keys"):
        ids.append(answer.json()["id"])

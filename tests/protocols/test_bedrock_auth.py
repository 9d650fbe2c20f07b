"""AWS credentials for Bedrock: the standard chain through botocore, resolved and refreshed off the
request path, signing per request; no secret in logs or errors.

Web identity is exercised for real: botocore's AssumeRoleWithWebIdentity provider calls a local STS
stand-in (``AWS_ENDPOINT_URL_STS``) that hands out credentials close to expiry, so botocore wants to renew
them on every read — which must happen in :meth:`AwsCredentials.tick`, never in :meth:`current`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from skyfabric.core.errors import ConfigError
from skyfabric.protocols.backends.bedrock_auth import AwsCredentials, sign
from tests.support.aws_env import clean_aws_env
from tests.support.bedrock_standin import ACCESS_KEY, SECRET_KEY, verify_sigv4


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS variables or files of the host; no instance metadata service."""
    return clean_aws_env(monkeypatch, tmp_path, standin_keys=False)


def test_keys_from_the_environment(aws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-1")
    chain = AwsCredentials()
    frozen = chain.current()
    assert frozen is not None and (frozen.access_key, frozen.token) == (ACCESS_KEY, "token-1")
    assert chain._thread is None  # static keys never expire: no refresh thread


def test_keys_from_a_named_profile_in_the_shared_file(aws: Path) -> None:
    (aws / "credentials").write_text(
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d\n\n"
        f"[prod]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    frozen = AwsCredentials("prod").current()
    assert frozen is not None and frozen.access_key == ACCESS_KEY
    default = AwsCredentials().current()
    assert default is not None and default.access_key == "AKIADEFAULT"


def test_an_unknown_profile_is_a_config_error_naming_it(aws: Path) -> None:
    with pytest.raises(ConfigError, match="'nope'"):
        AwsCredentials("nope")


def test_no_credentials_leaves_requests_unsigned_and_says_so_without_secrets(
    aws: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    chain = AwsCredentials(refresh_every=3600)
    try:
        assert chain.current() is None
        headers = [(b"content-type", b"application/json")]
        assert (
            sign(None, "us-east-1", "https://bedrock-runtime.us-east-1.amazonaws.com/x", headers, b"{}")
            == headers
        )
        assert "no AWS credentials found" in caplog.text
    finally:
        chain.close()


def test_a_signature_covers_host_path_body_and_the_token(aws: Path) -> None:
    from botocore.credentials import ReadOnlyCredentials

    url = "http://127.0.0.1:8443/model/anthropic.claude-x-v1%3A0/converse"
    frozen = ReadOnlyCredentials(ACCESS_KEY, SECRET_KEY, "session-token")
    signed = dict((k.decode(), v.decode()) for k, v in sign(frozen, "eu-west-1", url, [], b'{"a":1}'))
    assert signed["x-amz-security-token"] == "session-token"
    assert SECRET_KEY not in " ".join(signed.values())
    signed["host"] = "127.0.0.1:8443"
    keys = {ACCESS_KEY: (SECRET_KEY, "session-token")}
    target = "/model/anthropic.claude-x-v1%3A0/converse"
    verify_sigv4("POST", target, signed, b'{"a":1}', keys=keys, region="eu-west-1", now=time.time())
    with pytest.raises(Exception, match="scoped to a valid region"):
        verify_sigv4("POST", target, signed, b'{"a":1}', keys=keys, region="us-east-1", now=time.time())
    with pytest.raises(Exception, match="Signature expired"):
        verify_sigv4("POST", target, signed, b'{"a":1}', keys=keys, region="eu-west-1", now=time.time() + 600)
    with pytest.raises(Exception, match="security token included in the request is invalid"):
        verify_sigv4(
            "POST",
            target,
            signed,
            b'{"a":1}',
            keys={ACCESS_KEY: (SECRET_KEY, None)},
            region="eu-west-1",
            now=time.time(),
        )


# -- web identity, refreshed in the background ------------------------------------------------------------


class _Sts(BaseHTTPRequestHandler):
    """AssumeRoleWithWebIdentity, answering credentials that expire in 12 minutes (inside botocore's
    15-minute renewal window: every read wants a refresh)."""

    calls: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        form = self.rfile.read(int(self.headers["content-length"])).decode()
        type(self).calls.append(form)
        n = len(type(self).calls)
        expires = (datetime.now(UTC) + timedelta(minutes=12)).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = f"""<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>ASIAWEBIDENTITY{n:05d}</AccessKeyId>
      <SecretAccessKey>web-identity-secret-{n}</SecretAccessKey>
      <SessionToken>web-identity-token-{n}</SessionToken>
      <Expiration>{expires}</Expiration>
    </Credentials>
    <SubjectFromWebIdentityToken>system:serviceaccount:llm:gateway</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/bedrock/gw</Arn>
      <AssumedRoleId>AROA0000:gw</AssumedRoleId>
    </AssumedRoleUser>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>1b7a0a5e-0000-0000-0000-000000000000</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>""".encode()
        self.send_response(200)
        self.send_header("content-type", "text/xml")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def sts(aws: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    _Sts.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sts)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    (aws / "token").write_text("eyJhbGciOiJSUzI1NiJ9.service-account-token.sig")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(aws / "token"))
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/bedrock")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{server.server_port}")
    yield _Sts.calls
    server.shutdown()
    server.server_close()


def test_web_identity_is_resolved_at_start_and_refreshed_off_the_request_path(sts: list[str]) -> None:
    chain = AwsCredentials(refresh_every=3600)  # the thread will not tick during the test by itself
    try:
        assert len(sts) == 1 and "AssumeRoleWithWebIdentity" in sts[0]  # resolved now, not at a request
        first = chain.current()
        assert first is not None and first.access_key == "ASIAWEBIDENTITY00001"
        for _ in range(50):
            chain.current()  # the request path: never a call to STS, though botocore wants a renewal
        assert len(sts) == 1
        chain.tick()  # the background step: botocore renews what is about to expire
        assert len(sts) == 2
        second = chain.current()
        assert second is not None and second.token == "web-identity-token-2"
    finally:
        chain.close()


def test_the_background_thread_refreshes_by_itself(sts: list[str]) -> None:
    chain = AwsCredentials(refresh_every=0.05)
    try:
        assert chain._thread is not None and chain._thread.daemon
        deadline = time.monotonic() + 5
        while len(sts) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(sts) >= 3
        current = chain.current()
        assert current is not None and current.access_key != "ASIAWEBIDENTITY00001"
    finally:
        chain.close()
    assert chain._thread is not None
    chain._thread.join(1)
    assert not chain._thread.is_alive()

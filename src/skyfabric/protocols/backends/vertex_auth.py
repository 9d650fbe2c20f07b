"""OAuth access tokens for Vertex AI, from google-auth, refreshed in the background before they expire.

Why in the background: a token exchange is a round trip to Google's token endpoint (tens to hundreds of
milliseconds, seconds when it is slow), and google-auth does it with blocking I/O. Done on the request
path it would add that to the time to first token of whichever request found the token stale, and block
the event loop. So each credential has a task that fetches a token when the gateway starts and a fresh one
well before the current one expires (:func:`refresh_delay`); the request path only reads the cached token
(:meth:`TokenSource.header`). The blocking exchange runs in a worker thread.

Credentials come from google-auth's own loaders, never parsed here: a credentials JSON (service account
key, authorized user, external account for workload identity federation) by path, or Application Default
Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's user credentials, the metadata server that
serves GKE workload identity). Tokens are never logged; error texts are passed through :func:`redact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC
from typing import Any

from skyfabric.core.errors import ConfigError
from skyfabric.core.vertex_settings import CLOUD_PLATFORM_SCOPE, VertexSettings

log = logging.getLogger("skyfabric.protocols.vertex")

#: Refresh this long before expiry at most (a 1 h token is refreshed at 55 min) ...
REFRESH_MARGIN = 300.0
#: ... and at least this share of a short-lived token's life before expiry.
REFRESH_FRACTION = 0.5
#: A failed fetch is retried after 1, 2, 4 ... seconds, at most this long.
RETRY_MAX = 30.0
#: Longest one token exchange may take (the worker thread's HTTP timeout).
FETCH_TIMEOUT = 10.0

_SECRETS = re.compile(
    r"(ya29\.[A-Za-z0-9._\-]+"  # Google access tokens
    r"|eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"  # JWTs (assertions, id tokens)
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/\-]+=*"
    r"|\"(?:access_token|refresh_token|private_key|assertion|id_token)\"\s*:\s*\"[^\"]*\")"
)


def redact(text: str) -> str:
    """``text`` with anything that looks like a token, an assertion or a private key replaced."""
    return _SECRETS.sub("[redacted]", text)


def refresh_delay(
    now: float,
    fetched_at: float | None,
    expires_at: float | None,
    failures: int,
    *,
    margin: float = REFRESH_MARGIN,
    fraction: float = REFRESH_FRACTION,
    retry_max: float = RETRY_MAX,
) -> float:
    """Seconds from ``now`` until the next token fetch (a plain function of the time, for a fake clock).

    - After ``failures`` failed fetches in a row: 1, 2, 4 ... ``retry_max`` seconds (a token that is still
      valid keeps being served meanwhile).
    - With a token: at ``expires_at - min(margin, fraction × lifetime)``, so a one-hour token is refreshed
      five minutes early and a one-minute token half-way through its life.
    - A token that states no expiry is refreshed ``margin`` before an hour is up (Google's tokens last one).
    """
    if failures > 0:
        return min(retry_max, 2.0 ** (failures - 1))
    if fetched_at is None:
        return 0.0
    if expires_at is None:
        return 3600.0 - margin
    lifetime = max(0.0, expires_at - fetched_at)
    due = expires_at - min(margin, fraction * lifetime)
    return max(0.0, due - now)


def load_credentials(settings: VertexSettings, environ: dict[str, str] | None = None) -> tuple[Any, str]:
    """google-auth credentials for a pool, scoped for Vertex, and what they are (for logs, no secret).

    Raises :class:`ConfigError` when the named file or variable is missing or not a credentials JSON: that
    is the fleet file's mistake, said at start.
    """
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    env = os.environ if environ is None else environ
    try:
        if settings.credentials_file is not None or settings.credentials_env is not None:
            path = settings.credentials_file
            if path is None:
                assert settings.credentials_env is not None
                path = env.get(settings.credentials_env)
                if not path:
                    raise ConfigError(
                        f"vertex.credentials_env: the environment variable {settings.credentials_env} "
                        "is not set (it should hold the path of a credentials JSON)"
                    )
            credentials = credentials_from_file(path)
            return credentials, f"{type(credentials).__name__} from {path}"
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    except DefaultCredentialsError as exc:
        raise ConfigError(f"vertex credentials ({settings.credential_key}): {redact(str(exc))}") from None
    return credentials, f"{type(credentials).__name__} from Application Default Credentials"


def credentials_from_file(path: str) -> Any:
    """Credentials from a credentials JSON, by its ``type``, each with google-auth's loader for that type.

    ``service_account`` (a key), ``authorized_user`` (``gcloud auth application-default login``),
    ``external_account`` (workload identity federation: a file or URL subject token, AWS, or an
    executable). google-auth's generic loader is deprecated because it accepts any type from any file; here
    the type is checked first, and anything else is refused.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"vertex credentials: cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"vertex credentials: {path} is not JSON") from None
    kind = info.get("type") if isinstance(info, dict) else None
    scopes = [CLOUD_PLATFORM_SCOPE]
    try:
        if kind == "service_account":
            from google.oauth2 import service_account

            return service_account.Credentials.from_service_account_info(info, scopes=scopes)
        if kind == "authorized_user":
            from google.oauth2 import credentials as user

            return user.Credentials.from_authorized_user_info(info, scopes=scopes)
        if kind == "external_account":
            from google.auth import aws, identity_pool, pluggable

            source = info.get("credential_source") or {}
            if str(source.get("environment_id", "")).startswith("aws"):
                return aws.Credentials.from_info(info, scopes=scopes)
            if "executable" in source:
                return pluggable.Credentials.from_info(info, scopes=scopes)
            return identity_pool.Credentials.from_info(info, scopes=scopes)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"vertex credentials: {path} ({kind}): {redact(str(exc))}") from None
    raise ConfigError(
        f"vertex credentials: {path} has type {kind!r}; expected service_account, authorized_user or "
        "external_account (other kinds: leave the credentials unset and use Application Default Credentials)"
    )


def _transport() -> Any:
    """google-auth's urllib3 transport, with a bounded timeout (its default waits forever)."""
    import urllib3
    from google.auth.transport.urllib3 import Request

    return Request(urllib3.PoolManager(timeout=urllib3.Timeout(total=FETCH_TIMEOUT), retries=False))


class TokenSource:
    """One credential's current access token, kept fresh by :meth:`run`."""

    def __init__(
        self,
        key: str,
        credentials: Any,
        *,
        what: str = "",
        clock: Callable[[], float] = time.time,
        transport: Callable[[], Any] = _transport,
    ) -> None:
        self.key = key
        self.what = what
        self._credentials = credentials
        self._clock = clock
        self._transport = transport
        self._request: Any = None
        self.token: str | None = None
        self.fetched_at: float | None = None
        self.expires_at: float | None = None
        self.failures = 0
        #: Fetches that succeeded, and reads of the token by requests (how many found it expired).
        self.refreshes = 0
        self.reads = 0
        self.expired_reads = 0
        self.last_error: str | None = None
        self._headers: list[tuple[bytes, bytes]] = []

    def header(self) -> list[tuple[bytes, bytes]]:
        """The request path's read: ``authorization: Bearer <token>`` (and the quota project), or nothing.

        Never fetches. Without a token yet (the first fetch failed), no header is sent: Vertex answers 401,
        which the classifier treats as this endpoint's trouble, and the request goes elsewhere.
        """
        self.reads += 1
        if self.expires_at is not None and self._clock() >= self.expires_at:
            self.expired_reads += 1
        return self._headers

    def fetch(self) -> None:
        """One token exchange (blocking: call it in a worker thread)."""
        if self._request is None:
            self._request = self._transport()
        started = self._clock()
        self._credentials.refresh(self._request)
        token = self._credentials.token
        if not isinstance(token, str) or not token:
            raise RuntimeError("the credentials gave no access token")
        expiry = getattr(self._credentials, "expiry", None)
        expires_at = expiry.replace(tzinfo=UTC).timestamp() if expiry is not None else None
        headers = [(b"authorization", b"Bearer " + token.encode())]
        quota = getattr(self._credentials, "quota_project_id", None)
        if isinstance(quota, str) and quota:
            headers.append((b"x-goog-user-project", quota.encode()))
        # One assignment each: a request reading concurrently sees the old token or the new one.
        self.token, self.fetched_at, self.expires_at = token, started, expires_at
        self._headers = headers
        self.refreshes += 1

    async def refresh(self) -> bool:
        """Fetch a token in a worker thread; False (logged, redacted) when that failed."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.fetch), FETCH_TIMEOUT + 1.0)
        except Exception as exc:
            self.failures += 1
            self.last_error = redact(f"{type(exc).__name__}: {exc}")[:500]
            log.warning(
                "vertex: could not refresh the access token of %s (%s; attempt %d): %s",
                self.key,
                self.what,
                self.failures,
                self.last_error,
            )
            return False
        self.failures = 0
        self.last_error = None
        return True

    async def run(self) -> None:
        """Refresh before each expiry until cancelled."""
        while True:
            delay = refresh_delay(self._clock(), self.fetched_at, self.expires_at, self.failures)
            await asyncio.sleep(delay)
            await self.refresh()


class Tokens:
    """The token sources of one adapter: one per credential its pools name, each with its refresh task."""

    def __init__(
        self,
        *,
        load: Callable[[VertexSettings], tuple[Any, str]] = load_credentials,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._load = load
        self._clock = clock
        self.sources: dict[str, TokenSource] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def source(self, settings: VertexSettings) -> TokenSource | None:
        return self.sources.get(settings.credential_key)

    async def start(self, settings: Iterable[VertexSettings]) -> None:
        """Load each credential (a bad one is a :class:`ConfigError`), fetch first tokens, start refreshing.

        A first fetch that fails does not stop the gateway: its task retries, and meanwhile that pool's
        requests fail over as unauthenticated.
        """
        fresh: list[TokenSource] = []
        for pool in settings:
            key = pool.credential_key
            if key in self.sources:
                continue
            credentials, what = self._load(pool)
            source = self.sources[key] = TokenSource(key, credentials, what=what, clock=self._clock)
            fresh.append(source)
        await asyncio.gather(*(s.refresh() for s in fresh))
        loop = asyncio.get_running_loop()
        for source in fresh:
            self._tasks[source.key] = loop.create_task(source.run(), name=f"vertex token {source.key}")
            log.info(
                "vertex: credential %s (%s) has a token: %s",
                source.key,
                source.what,
                source.token is not None,
            )

    async def close(self) -> None:
        """Stop the refresh tasks."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

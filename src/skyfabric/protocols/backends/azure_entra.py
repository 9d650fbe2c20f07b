"""Microsoft Entra ID bearer tokens for Azure OpenAI, fetched and refreshed off the request path.

One :class:`EntraToken` per credential (authority, tenant, client, secret or federated token file) runs a
daemon thread that obtains a token with the OAuth 2.0 client-credentials grant
(``POST {authority}/{tenant}/oauth2/v2.0/token``, scope ``https://cognitiveservices.azure.com/.default``)
and obtains the next one before the current expires (:func:`refresh_delay`); the request path only reads
the cached token (:meth:`EntraToken.header`). A failed refresh is retried with back-off while the old
token is still good.

Why not ``azure-identity``: its credentials fetch on ``get_token``, i.e. on whoever calls them (here: the
request path), so a refresher thread would be needed around it anyway; it brings MSAL, azure-core,
``requests`` and ``cryptography`` for what is one form POST; and it insists on an ``https`` authority with
instance discovery, which a loopback stand-in cannot offer without a trusted certificate. The grant is
small and fully specified (RFC 6749 §4.4, RFC 7523 for the federated assertion), and its one request is
tested against a token endpoint that verifies it (``tests/support/azure_standin.py``).

The secret is read from the environment at each fetch (rotation needs no restart) and appears in no log
line and no exception text: Entra's error bodies are logged by their ``error`` code and description only,
with anything that equals the secret, the assertion or the token cut out.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable

from skyfabric.core.fleet_azure import AzureOpenAISettings

log = logging.getLogger("skyfabric.protocols.azure")

#: The audience Azure OpenAI (Cognitive Services) accepts.
SCOPE = "https://cognitiveservices.azure.com/.default"
#: How long the fleet's loading waits for each credential's first token.
FIRST_TOKEN_WAIT = 10.0
#: Longest wait between attempts after a failed fetch.
MAX_BACKOFF = 30.0
#: Seconds one token request may take.
REQUEST_TIMEOUT = 10.0


class TokenError(Exception):
    """A token request failed; the message is safe to log (no secret, assertion or token in it)."""


def refresh_delay(expires_in: float) -> float:
    """Seconds after a token is issued to fetch the next one: five minutes before it expires (as Azure's
    SDKs do), or halfway through a token that lives less than ten minutes."""
    return max(0.0, expires_in - min(300.0, expires_in / 2))


def usable_for(expires_in: float) -> float:
    """Seconds after issue that a token is still sent: its life less a skew for clocks and transit."""
    return max(0.0, expires_in - min(30.0, expires_in / 10))


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` fetches in a row failed: 1, 2, 4, ... up to :data:`MAX_BACKOFF`."""
    return float(min(MAX_BACKOFF, 2 ** max(0, failures - 1)))


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every non-empty secret in it replaced by ``[redacted]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


class EntraToken:
    """The current Entra ID token of one credential, kept fresh by a background thread."""

    def __init__(self, settings: AzureOpenAISettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._valid_until = 0.0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Tokens obtained so far (for tests and metrics).
        self.fetches = 0

    @property
    def url(self) -> str:
        """The tenant's token endpoint."""
        tenant = urllib.parse.quote(self.settings.tenant_id or "", safe="")
        return f"{self.settings.authority.rstrip('/')}/{tenant}/oauth2/v2.0/token"

    # -- the request path ---------------------------------------------------------------------------------

    def header(self) -> bytes | None:
        """``Bearer <token>``, or None when there is no valid token (never waits: it reads the cache).

        The fleet's loading obtained the first token (:meth:`wait_first`); an endpoint this source has not
        seen before (discovered later) starts the refresher here and goes without until it has one (Azure
        answers 401, a retryable verdict: the request goes elsewhere).
        """
        token = self._current()
        if token is None:
            self.start()
        return None if token is None else b"Bearer " + token.encode()

    def wait_first(self, timeout: float = FIRST_TOKEN_WAIT) -> bool:
        """Start the refresher and wait (at load, not on a request) until its first fetch has ended."""
        self.start()
        self._ready.wait(timeout)
        return self._current() is not None

    def _current(self) -> str | None:
        with self._lock:
            if self._token is not None and self.clock() < self._valid_until:
                return self._token
            return None

    # -- the refresher ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the refresher thread (once); the first token is requested at once."""
        with self._lock:
            if self._thread is not None:
                return
            ref = weakref.ref(self)
            self._thread = threading.Thread(
                target=_refresh_loop, args=(ref, self._stop), name="entra-token", daemon=True
            )
        self._thread.start()

    def close(self) -> None:
        """Stop refreshing."""
        self._stop.set()

    def refresh_once(self) -> float:
        """Fetch a token now; the seconds until the next fetch (a back-off is the caller's on failure)."""
        token, expires_in = self.fetch()
        with self._lock:
            self._token = token
            self._valid_until = self.clock() + usable_for(expires_in)
            self.fetches += 1
        self._ready.set()
        return refresh_delay(expires_in)

    def attempted(self) -> None:
        """The first fetch failed: requests stop waiting for it (they go without, and are refused)."""
        self._ready.set()

    def fetch(self) -> tuple[str, float]:
        """One client-credentials grant: (access token, seconds it lives). Raises :class:`TokenError`."""
        settings = self.settings
        form = {
            "grant_type": "client_credentials",
            "client_id": settings.client_id or "",
            "scope": SCOPE,
        }
        secret: str | None = None
        if settings.federated_token_file:
            try:
                with open(settings.federated_token_file, encoding="utf-8") as fh:
                    secret = fh.read().strip()  # re-read each time: the kubelet rotates it
            except OSError as exc:
                raise TokenError(
                    f"cannot read federated_token_file {settings.federated_token_file}: {exc.strerror}"
                ) from None
            form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            form["client_assertion"] = secret
        else:
            secret = os.environ.get(settings.secret_env)
            if not secret:
                raise TokenError(f"environment variable {settings.secret_env} (the client secret) is not set")
            form["client_secret"] = secret
        request = urllib.request.Request(
            self.url,
            data=urllib.parse.urlencode(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            detail = _entra_error(exc.read())
            raise TokenError(redact(f"token endpoint answered {exc.code}: {detail}", secret)) from None
        except (OSError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TokenError(redact(f"token endpoint unreachable: {reason}", secret)) from None
        try:
            answer = json.loads(body)
            token = answer["access_token"]
            expires_in = float(answer["expires_in"])
        except (ValueError, KeyError, TypeError):
            raise TokenError("token endpoint answered without access_token/expires_in") from None
        if not isinstance(token, str) or not token:
            raise TokenError("token endpoint answered an empty access_token")
        return token, expires_in


def _entra_error(body: bytes) -> str:
    """Entra's ``{"error", "error_description"}`` as one line (descriptions name codes, never secrets)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if not isinstance(obj, dict):
        return "unreadable error"
    description = str(obj.get("error_description") or "").split("\r\n")[0].split("\n")[0]
    return f"{obj.get('error', 'error')}: {description}"[:300]


def _refresh_loop(ref: weakref.ReferenceType[EntraToken], stop: threading.Event) -> None:
    """The refresher: fetch, sleep until the next fetch is due, repeat; back off after failures.

    Holds the token source only weakly between fetches, so a source nobody uses any more (a gateway
    closed) lets its thread end.
    """
    failures = 0
    while not stop.is_set():
        source = ref()
        if source is None:
            return
        try:
            delay = source.refresh_once()
            failures = 0
        except TokenError as exc:
            source.attempted()
            failures += 1
            delay = backoff(failures)
            log.warning(
                "entra token for client %s in tenant %s: %s (retrying in %.0fs)",
                source.settings.client_id,
                source.settings.tenant_id,
                exc,
                delay,
            )
        del source
        # wake at least every few seconds to notice a source that is gone
        deadline = time.monotonic() + delay
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if stop.wait(min(left, 5.0)) or ref() is None:
                return

"""AWS credentials and SigV4 signing for Bedrock, through botocore (never by hand).

**Where credentials come from.** Only botocore's standard chain: environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), the shared credentials and config files (a pool's
``profile``, else ``AWS_PROFILE``), web identity (``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``), SSO,
container and instance roles. The fleet file names a profile at most, never a key.

**When.** Resolving may be slow — web identity and assumed roles call STS, instance roles call the metadata
service — and botocore refreshes expiring credentials synchronously inside whichever call reads them. So
the request path never reads botocore's credentials object: :class:`AwsCredentials` resolves them when the
fleet loads (``prepare``), keeps a frozen snapshot, and a daemon thread refreshes that snapshot every
``refresh_every`` seconds (botocore renews credentials 15 minutes before they expire, so the snapshot
the request path signs with is always a valid one). Static keys never expire and get no thread.

**Signing** is per request (SigV4 covers the method, path, signed headers and a hash of the body):
:func:`sign` takes the snapshot and returns the headers to add. Nothing here logs or formats a secret:
errors name the profile and the kind of failure only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials, RefreshableCredentials
from botocore.exceptions import ProfileNotFound
from botocore.session import Session

from skyfabric.core.errors import ConfigError

log = logging.getLogger("skyfabric.protocols.bedrock")

#: The SigV4 signing name of the Bedrock runtime (its host is ``bedrock-runtime.<region>...``).
SERVICE = "bedrock"

Headers = list[tuple[bytes, bytes]]


class AwsCredentials:
    """One credential chain (a profile's, or the default one): resolved now, refreshed in the background."""

    def __init__(
        self,
        profile: str | None = None,
        *,
        refresh_every: float = 30.0,
        session: Callable[[str | None], Any] = lambda profile: Session(profile=profile),
    ) -> None:
        self.profile = profile
        self._session_factory = session
        self._every = refresh_every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._source: Any = None
        self._frozen: ReadOnlyCredentials | None = None
        self._resolve()
        if self._frozen is None:
            log.warning(
                "no AWS credentials found for %s: Bedrock requests go unsigned (and are refused) until "
                "the standard chain provides some",
                self._name,
            )
        if self._frozen is None or isinstance(self._source, RefreshableCredentials):
            self._thread = threading.Thread(
                target=self._run, name=f"aws-credentials:{self._name}", daemon=True
            )
            self._thread.start()

    @property
    def _name(self) -> str:
        return f"profile {self.profile!r}" if self.profile else "the default profile"

    def current(self) -> ReadOnlyCredentials | None:
        """The latest snapshot (no I/O: this is what the request path reads)."""
        return self._frozen

    def tick(self) -> None:
        """One refresh step, off the request path: botocore renews what is about to expire."""
        if self._source is None:
            self._resolve()
            return
        try:
            self._frozen = self._source.get_frozen_credentials()
        except Exception as exc:  # keep the last snapshot: it is still valid for minutes
            log.warning("refreshing AWS credentials for %s failed: %s", self._name, type(exc).__name__)

    def close(self) -> None:
        """Stop the refresh thread (idempotent)."""
        self._stop.set()

    def _resolve(self) -> None:
        try:
            self._source = self._session_factory(self.profile).get_credentials()
            self._frozen = None if self._source is None else self._source.get_frozen_credentials()
        except ProfileNotFound:
            raise ConfigError(f"AWS profile {self.profile!r} is not in the shared config files") from None
        except Exception as exc:  # STS or the metadata service unreachable: retried by the thread
            # The kind of failure only: botocore's messages may quote a credentials file's lines.
            log.warning("resolving AWS credentials for %s failed: %s", self._name, type(exc).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self.tick()
            except ConfigError as exc:  # the profile vanished from the files since: keep the snapshot
                log.warning("%s", exc)


def sign(
    credentials: ReadOnlyCredentials | None, region: str, url: str, headers: Headers, body: bytes
) -> Headers:
    """``headers`` with SigV4's ``authorization``, ``x-amz-date`` (and ``x-amz-security-token``) added.

    ``url`` must be the URL the request goes to (its host and path are signed as sent). Without
    credentials the request goes unsigned: the service refuses it, which the classifier treats as this
    endpoint's fault, not the client's.
    """
    if credentials is None:
        return headers
    request = AWSRequest(
        method="POST", url=url, data=body, headers={k.decode(): v.decode() for k, v in headers}
    )
    SigV4Auth(credentials, SERVICE, region).add_auth(request)
    return [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]

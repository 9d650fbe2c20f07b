"""Managed API keys: what a key is allowed, and how its secret is made, stored and matched.

A secret is ``sk-sf-`` and 43 URL-safe random characters (256 bits). Only its SHA-256 is stored: a stolen
database opens nothing, and looking a presented key up by its digest means no comparison ever runs over the
secret itself (a timing difference can only reveal bits of a digest, which help no one find a preimage).
A key is shown afterwards by a hint: its prefix and last four characters.

Rotation gives a key a new secret and keeps the previous one valid until an overlap deadline, under the
same id, so the key's limits and counters carry over while clients switch.
"""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Literal

#: Every managed key starts with this, so that secret scanners and people recognise it.
PREFIX = "sk-sf-"

Period = Literal["day", "month"]
Policy = Literal["open", "closed"]


def new_secret() -> str:
    """A fresh key secret."""
    return PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    """A fresh key id: public, safe to log, what the admin API and the ledger name a key by."""
    return "key_" + secrets.token_hex(8)


def digest(secret: str | bytes) -> str:
    """The stored form of a secret (hex SHA-256)."""
    if isinstance(secret, str):
        secret = secret.encode()
    return hashlib.sha256(secret).hexdigest()


def hint(secret: str) -> str:
    """How a key is shown once its secret is gone: ``sk-sf-…AbCd``."""
    shown = PREFIX if secret.startswith(PREFIX) else ""
    return shown + "…" + secret[-4:]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key and its limits, as stored (digests, never the secret). ``None`` limits are unlimited."""

    id: str
    name: str
    hash: str
    hint: str
    created: float
    team: str | None = None
    expires: float | None = None
    revoked: float | None = None
    #: Globs over model names (as the client asks, or canonical); empty: every model.
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    #: Currency (USD, by the fleet's token prices) per ``budget_period``.
    budget: float | None = None
    budget_period: Period = "month"
    #: While Redis is unreachable: None takes the fleet's ``operations.limits.failure_policy``.
    failure_policy: Policy | None = None
    #: The secret before the last rotation, and until when it still opens the key.
    prev_hash: str | None = None
    prev_until: float | None = None
    updated: float = 0.0

    #: Whether any limit applies (a key without any costs no trip to the limits' state). Always computed
    #: from the limits (``__post_init__``), whatever is passed: a field rather than a property because the
    #: keys filter reads it for every request, and a property is a call; a field with a default so that
    #: ``KeyRecord(**asdict(record))`` and ``replace`` work as for any dataclass.
    limited: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        limited = (
            self.rpm is not None
            or self.tpm is not None
            or self.max_concurrent is not None
            or self.budget is not None
        )
        object.__setattr__(self, "limited", limited)

    def allows(self, requested: str, canonical: str) -> bool:
        """Whether the key may use a model known as ``requested`` (the client's name) or ``canonical``."""
        if not self.models:
            return True
        match = fnmatch.fnmatchcase
        return any(match(requested, glob) or match(canonical, glob) for glob in self.models)

    def refusal(self, now: float, matched: str) -> str | None:
        """Why the key cannot be used at ``now`` presented as digest ``matched``, or None."""
        if self.revoked is not None:
            return "the API key has been revoked"
        if self.expires is not None and now >= self.expires:
            return "the API key has expired"
        if matched != self.hash and (self.prev_until is None or now >= self.prev_until):
            return "the API key was rotated and its previous secret is no longer valid"
        return None

    def public(self) -> dict[str, Any]:
        """The key as the admin API shows it: everything but digests."""
        return {
            "id": self.id,
            "name": self.name,
            "team": self.team,
            "hint": self.hint,
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "models": list(self.models),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrent": self.max_concurrent,
            "budget": self.budget,
            "budget_period": self.budget_period,
            "failure_policy": self.failure_policy,
            "previous_valid_until": self.prev_until,
        }

    def rotated(self, secret: str, now: float, overlap: float) -> KeyRecord:
        """This key with a new secret; the current one stays valid for ``overlap`` seconds."""
        return replace(
            self,
            hash=digest(secret),
            hint=hint(secret),
            prev_hash=self.hash,
            prev_until=now + overlap,
            updated=now,
        )


def static_record(secret: str, name: str) -> KeyRecord:
    """A key of the fleet file's ``api_keys``: no limits, id from its name (never from the secret)."""
    return KeyRecord(id=f"static:{name}", name=name, hash=digest(secret), hint=hint(secret), created=0.0)

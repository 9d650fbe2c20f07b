"""The admin API for managed keys, served on the gateway's listener under ``/admin/keys``.

=======  ==========================  =====================================================================
POST     /admin/keys                 create; the answer holds the secret (``key``), shown this once
GET      /admin/keys                 list (never secrets, never digests)
GET      /admin/keys/{id}            one key
PATCH    /admin/keys/{id}            change its name, team, models, limits, budget, expiry, policy
POST     /admin/keys/{id}/rotate     a new secret; the current one stays valid ``overlap_seconds`` (1 day)
POST     /admin/keys/{id}/revoke     revoke (also ``DELETE /admin/keys/{id}``); permanent, idempotent
=======  ==========================  =====================================================================

Guarded by its own credential, ``Authorization: Bearer <admin key>``, read from the environment variable
the fleet file names (``operations.admin_key_env``); an API key never opens it, nor it the inference API.
Errors are client errors (:mod:`skyfabric.core.errors`); the gateway renders them.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skyfabric.core.errors import AuthenticationError, InvalidRequest, NotFound, Overloaded
from skyfabric.ops.keycache import KeyCache
from skyfabric.ops.keys import KeyRecord, digest, hint, new_key_id, new_secret
from skyfabric.ops.keystore import KeyStore

_Limit = Annotated[int, Field(ge=1, le=10**12)]
_Glob = Annotated[str, Field(min_length=1, max_length=200)]
_Text = Annotated[str, Field(min_length=1, max_length=200)]
_MAX_TIME = 4102444800.0  # 2100-01-01


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    team: _Text | None = None
    models: list[_Glob] | None = Field(None, max_length=256)
    rpm: _Limit | None = None
    tpm: _Limit | None = None
    max_concurrent: _Limit | None = None
    budget: float | None = Field(None, ge=0, le=1e9, allow_inf_nan=False)
    budget_period: Literal["day", "month"] | None = None
    expires_at: float | None = Field(None, gt=0, lt=_MAX_TIME, allow_inf_nan=False, description="unix time")
    expires_in: float | None = Field(None, gt=0, le=100 * 365 * 86400, allow_inf_nan=False, description="s")
    failure_policy: Literal["open", "closed"] | None = None


class CreateBody(_Body):
    name: _Text


class UpdateBody(_Body):
    name: _Text | None = None


class RotateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_seconds: float = Field(86400.0, ge=0, le=30 * 86400, allow_inf_nan=False)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    if not body.strip():
        data: Any = {}
    else:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Location and message only: the input is never echoed (it could hold anything).
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}", param=where) from None


def _method_not_allowed(method: str, path: str) -> InvalidRequest:
    err = InvalidRequest(f"method {method} not allowed on {path}")
    err.status = 405
    return err


class AdminApi:
    """Key management over HTTP: parses, checks the admin credential, changes the store and the cache."""

    def __init__(
        self,
        store: KeyStore | None,
        cache: KeyCache,
        credential: str | None,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache = cache
        self._credential = digest(credential) if credential else None
        self.wall = wall

    @property
    def enabled(self) -> bool:
        return self.store is not None and self._credential is not None

    def _check(self, authorization: bytes | None) -> None:
        if not self.enabled:
            raise NotFound(
                "the admin API is off: give the fleet file `operations.admin_key_env` and set that variable"
            )
        presented = b""
        if authorization is not None and authorization[:7].lower() == b"bearer ":
            presented = authorization[7:].strip()
        if not presented or not hmac.compare_digest(digest(presented), self._credential or ""):
            raise AuthenticationError("the admin API needs `Authorization: Bearer <admin key>`")

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:  # the database's driver errors: out of reach for now
            why = f"the key database is unreachable ({type(exc).__name__}); try again"
            err = Overloaded(why, retry_after=1, status=503)
            err.code = "database_unavailable"
            raise err from None

    async def handle(
        self, method: str, path: str, authorization: bytes | None, body: bytes
    ) -> tuple[int, bytes]:
        """Answer one admin request: (status, JSON body); raises client errors."""
        self._check(authorization)
        parts = path.rstrip("/").split("/")[1:]  # ["admin", "keys", id?, verb?]
        if parts[:2] != ["admin", "keys"] or len(parts) > 4:
            raise NotFound(f"no route for {path}")
        if len(parts) == 2:
            if method == "GET":
                records = await self._db(self.store.all)  # type: ignore[union-attr]
                return 200, orjson.dumps({"object": "list", "data": [r.public() for r in records]})
            if method == "POST":
                return await self.create(_parse(CreateBody, body))
            raise _method_not_allowed(method, path)
        key_id = parts[2]
        if len(parts) == 3:
            if method == "GET":
                return 200, orjson.dumps((await self._get(key_id)).public())
            if method == "PATCH":
                return await self.update(key_id, _parse(UpdateBody, body))
            if method == "DELETE":
                return await self.revoke(key_id)
            raise _method_not_allowed(method, path)
        verb = parts[3]
        if verb not in ("rotate", "revoke"):
            raise NotFound(f"no route for {path}")
        if method != "POST":
            raise _method_not_allowed(method, path)
        if verb == "rotate":
            return await self.rotate(key_id, _parse(RotateBody, body))
        return await self.revoke(key_id)

    async def _get(self, key_id: str) -> KeyRecord:
        record: KeyRecord | None = await self._db(self.store.get, key_id)  # type: ignore[union-attr]
        if record is None:
            raise NotFound(f"no API key with id {key_id!r}"[:200], code="key_not_found")
        return record

    def _fields(self, body: _Body, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in body.model_fields_set:
            value = getattr(body, name)
            if name == "models":
                out["models"] = tuple(value or ())
            elif name == "expires_in":
                out["expires"] = None if value is None else now + value
            elif name == "expires_at":
                out["expires"] = value
            elif name == "budget_period":
                out["budget_period"] = value or "month"
            else:
                out[name] = value
        if body.expires_in is not None and body.expires_at is not None:
            raise InvalidRequest("give expires_in or expires_at, not both", param="expires_in")
        return out

    async def create(self, body: CreateBody) -> tuple[int, bytes]:
        now = self.wall()
        secret = new_secret()
        fields = self._fields(body, now)
        record = KeyRecord(
            id=new_key_id(), hash=digest(secret), hint=hint(secret), created=now, updated=now, **fields
        )
        await self._db(self.store.insert, record)  # type: ignore[union-attr]
        self.cache.put(record)
        return 201, orjson.dumps({**record.public(), "key": secret})

    async def update(self, key_id: str, body: UpdateBody) -> tuple[int, bytes]:
        record = await self._get(key_id)
        now = self.wall()
        fields = self._fields(body, now)
        if fields.get("name", record.name) is None:
            raise InvalidRequest("name cannot be null", param="name")
        record = replace(record, **fields, updated=now)
        await self._db(self.store.update, record)  # type: ignore[union-attr]
        self.cache.put(record)
        return 200, orjson.dumps(record.public())

    async def rotate(self, key_id: str, body: RotateBody) -> tuple[int, bytes]:
        record = await self._get(key_id)
        if record.revoked is not None:
            raise InvalidRequest("a revoked key cannot be rotated", code="key_revoked")
        secret = new_secret()
        record = record.rotated(secret, self.wall(), body.overlap_seconds)
        await self._db(self.store.update, record)  # type: ignore[union-attr]
        self.cache.put(record)
        return 200, orjson.dumps({**record.public(), "key": secret})

    async def revoke(self, key_id: str) -> tuple[int, bytes]:
        record = await self._get(key_id)
        if record.revoked is None:
            now = self.wall()
            record = replace(record, revoked=now, updated=now)
            await self._db(self.store.update, record)  # type: ignore[union-attr]
            self.cache.put(record)
        return 200, orjson.dumps(record.public())

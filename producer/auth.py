"""Who is calling (API key or JWT -> tenant), what their request ids are, and how much they may send.

Everything here is pure CPU work of microseconds (an RS256 verify is the slowest, ~50 µs),
so the gateway calls it on the event loop.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jwt

from inferlog.errors import ConfigError, InferlogError
from inferlog.settings import Settings

log = logging.getLogger(__name__)

OPEN_TENANT = "default"


class AuthError(InferlogError):
    """401: no or bad credentials; 403: valid credentials that name no tenant."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class QuotaExceeded(InferlogError):
    """429, with how long to wait before trying again."""

    def __init__(self, detail: str, retry_after: float):
        super().__init__(detail)
        self.detail, self.retry_after = detail, retry_after


# -- identity ------------------------------------------------------------------------------
def parse_api_keys(spec: str) -> dict[str, str]:
    """"key1:tenantA,key2:tenantB" -> {key: tenant}."""
    keys: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, tenant = item.rpartition(":")
        if not sep or not key or not tenant:
            raise ConfigError("api_keys entries are key:tenant, separated by commas")
        keys[key] = tenant
    return keys


class Authenticator:
    def __init__(self, api_keys: dict[str, str] | None = None, *, jwt_secret: str | None = None,
                 jwt_public_key: str | None = None, tenant_claim: str = "tenant", audience: str | None = None):
        self.api_keys = dict(api_keys or {})
        self.keys: list[tuple[str, str]] = []  # (algorithm, key) tried in order
        if jwt_secret:
            self.keys.append(("HS256", jwt_secret))
        if jwt_public_key:
            self.keys.append(("RS256", jwt_public_key))
        self.tenant_claim, self.audience = tenant_claim, audience

    @classmethod
    def from_settings(cls, s: Settings) -> "Authenticator":
        keys = parse_api_keys(s.api_keys.get_secret_value()) if s.api_keys else {}
        if s.api_keys_file:
            try:
                loaded = json.loads(Path(s.api_keys_file).read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"api_keys_file {s.api_keys_file}: {e}") from e
            if not isinstance(loaded, dict) or not all(isinstance(v, str) and v for v in loaded.values()):
                raise ConfigError(f"api_keys_file {s.api_keys_file} must hold a JSON object {{key: tenant}}")
            keys.update(loaded)
        pem = s.jwt_public_key
        if pem and not pem.lstrip().startswith("-----BEGIN") and os.path.exists(pem):
            pem = Path(pem).read_text()
        return cls(keys, jwt_secret=s.jwt_secret.get_secret_value() if s.jwt_secret else None,
                   jwt_public_key=pem, tenant_claim=s.jwt_tenant_claim, audience=s.jwt_audience)

    @property
    def open(self) -> bool:
        return not self.api_keys and not self.keys

    def tenant(self, authorization: str | None, api_key: str | None) -> str:
        """The caller's tenant from `X-API-Key: <key>` or `Authorization: Bearer <key or JWT>`."""
        if self.open:
            return OPEN_TENANT
        token = api_key
        if token is None and authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError(401, "Authorization must be 'Bearer <token>'")
            token = token.strip()
        if not token:
            raise AuthError(401, "credentials required: X-API-Key header or Authorization: Bearer <token>")
        # compare_digest over every key: the time taken does not say which prefix matched
        found = None
        for key, tenant in self.api_keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                found = tenant
        if found is not None:
            return found
        if not self.keys or token.count(".") != 2:
            raise AuthError(401, "unknown API key")
        return self._jwt_tenant(token)

    def _jwt_tenant(self, token: str) -> str:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError as e:
            raise AuthError(401, f"invalid token: {e}") from None
        # the algorithm is pinned per key: an RS256 public key is never used as an HS256 secret
        key = next((k for a, k in self.keys if a == alg), None)
        if key is None:
            raise AuthError(401, f"token algorithm {alg!r} is not accepted")
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience,
                                options={"require": ["exp"], "verify_aud": self.audience is not None})
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidTokenError as e:
            raise AuthError(401, f"invalid token: {e}") from None
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not tenant or len(tenant) > 128:
            raise AuthError(403, f"token has no usable {self.tenant_claim!r} claim")
        return tenant


# -- request ids -----------------------------------------------------------------------------
class IdSigner:
    """Request ids `<uuid7>.<tag>`: the uuid7 carries the creation time (bounds a lookup in
    the results log), the tag is an HMAC of it with the tenant (any replica holding the
    secret can tell whose id it is, so another tenant's id is a 404 without shared state)."""

    def __init__(self, secret: bytes | None = None):
        self.secret = secret or secrets.token_bytes(32)

    def new(self, tenant: str) -> str:
        base = str(_uuid7())
        return f"{base}.{self._tag(base, tenant)}"

    def owns(self, request_id: str, tenant: str) -> bool:
        base, _, tag = request_id.partition(".")
        # bytes: compare_digest refuses str with non-ASCII characters, and any id can arrive in a URL
        return bool(tag) and hmac.compare_digest(tag.encode(), self._tag(base, tenant).encode())

    def _tag(self, base: str, tenant: str) -> str:
        return hmac.new(self.secret, f"{base}\0{tenant}".encode(), hashlib.sha256).hexdigest()[:24]

    @staticmethod
    def created_ms(request_id: str) -> int | None:
        try:
            u = uuid.UUID(request_id.partition(".")[0])
        except ValueError:
            return None
        return u.int >> 80 if u.version == 7 else None


def _uuid7() -> uuid.UUID:
    # RFC 9562: 48-bit ms timestamp, version 7, 74 random bits (uuid.uuid7 arrives in 3.14)
    n = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big") & ((1 << 80) - 1)
    n = n & ~(0xF << 76) | 0x7 << 76  # version
    n = n & ~(0x3 << 62) | 0x2 << 62  # variant
    return uuid.UUID(int=n)


# -- quotas ----------------------------------------------------------------------------------
@dataclass
class Bucket:
    """Token bucket that refuses instead of sleeping (the CLI's TokenBucket waits; a server must not)."""

    rate: float
    capacity: float
    tokens: float
    last: float

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def _quota_key(tenant: str, model: str | None) -> str | tuple[str, str]:
    return tenant if model is None else (tenant, model)


@dataclass
class Quotas:
    """Per-tenant rate (token bucket) and in-flight quota (submitted, not yet answered), each
    model apart: a tenant's backlog on one model does not use up its quota on another.

    Both are per replica: with N replicas a tenant gets N times these."""

    rate: float
    burst: int
    max_in_flight: int
    ttl: float = 600.0  # an in-flight entry no answer came for stops counting after this
    clock: Callable[[], float] = time.monotonic
    # by tenant, or (tenant, model)
    buckets: dict[str | tuple[str, str], Bucket] = field(default_factory=dict)
    in_flight: dict[str | tuple[str, str], int] = field(default_factory=dict)
    owners: dict[str, tuple[str | tuple[str, str], float]] = field(default_factory=dict)  # request_id -> (key, since)

    @classmethod
    def from_settings(cls, s: Settings) -> "Quotas":
        return cls(s.tenant_rate, s.tenant_burst, s.tenant_max_in_flight, ttl=s.gateway_cache_ttl_s)

    def admit(self, tenant: str, model: str | None = None) -> None:
        """Raise QuotaExceeded, or take one token (the caller then track()s the request)."""
        now = self.clock()
        self._expire(now)
        key, of = _quota_key(tenant, model), f" for model {model!r}" if model else ""
        if self.in_flight.get(key, 0) >= self.max_in_flight:
            raise QuotaExceeded(f"tenant {tenant!r} has {self.max_in_flight} requests in flight{of}", 1.0)
        if self.rate > 0:
            b = self.buckets.get(key)
            if b is None:
                b = self.buckets[key] = Bucket(self.rate, self.burst, self.burst, now)
            wait = b.take(now)
            if wait:
                raise QuotaExceeded(f"tenant {tenant!r} is over {self.rate:g} requests/s{of}", wait)

    def track(self, request_id: str, tenant: str, model: str | None = None) -> None:
        key = _quota_key(tenant, model)
        self.owners[request_id] = (key, self.clock())
        self.in_flight[key] = self.in_flight.get(key, 0) + 1

    def done(self, request_id: str) -> None:
        owner = self.owners.pop(request_id, None)
        if owner is not None:
            self.in_flight[owner[0]] -= 1

    def _expire(self, now: float) -> None:
        # dicts keep insertion order, so the oldest entries come first
        while self.owners:
            rid, (_, since) = next(iter(self.owners.items()))
            if now - since < self.ttl:
                break
            self.done(rid)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))

"""The HTTP gateway's parts that need no broker: signed request ids, per-tenant quotas, API
keys and open mode, the bounded outcome cache. tests/broker/test_gateway.py runs the gateway
against a real broker and a real worker."""
from __future__ import annotations

import time

import pytest

from inferlog.errors import ConfigError
from inferlog.producer.auth import AuthError, Authenticator, IdSigner, QuotaExceeded, Quotas, parse_api_keys
from inferlog.producer.replies import Outcome, OutcomeCache


def test_request_ids_carry_their_time_and_owner():
    signer, other = IdSigner(b"k" * 32), IdSigner(b"j" * 32)
    rid = signer.new("tenant-a")
    assert signer.owns(rid, "tenant-a") and not signer.owns(rid, "tenant-b") and not other.owns(rid, "tenant-a")
    assert not signer.owns(rid.split(".")[0], "tenant-a") and not signer.owns("garbage", "tenant-a")
    assert not signer.owns(rid + "\u00e9", "tenant-a") and not signer.owns("x.\u00e9\u00e9", "tenant-a")  # was a 500
    assert abs(IdSigner.created_ms(rid) - time.time() * 1000) < 5000 and IdSigner.created_ms("x.y") is None
    assert len(rid) <= 128


def test_quotas_refill_and_release():
    now = [0.0]
    q = Quotas(rate=2, burst=2, max_in_flight=3, ttl=60, clock=lambda: now[0])
    for i in range(2):
        q.admit("a")
        q.track(f"r{i}", "a")
    with pytest.raises(QuotaExceeded) as e:
        q.admit("a")
    assert 0 < e.value.retry_after <= 0.5  # a token every 0.5 s
    now[0] += 0.5
    q.admit("a")
    q.track("r2", "a")
    now[0] += 10
    with pytest.raises(QuotaExceeded, match="in flight"):
        q.admit("a")
    q.done("r0")
    q.admit("a")
    assert q.in_flight["a"] == 2
    now[0] += 61
    q.admit("a")  # entries no answer came for within the ttl stop counting
    assert q.in_flight["a"] == 0


def test_api_keys_and_open_mode():
    assert parse_api_keys(" k1:a , k:2:b,") == {"k1": "a", "k:2": "b"}
    with pytest.raises(ConfigError):
        parse_api_keys("no-tenant")
    assert Authenticator().tenant(None, None) == "default"
    with pytest.raises(AuthError) as e:
        Authenticator({"k": "a"}).tenant("Basic Zm9v", None)
    assert e.value.status == 401


def test_outcome_cache_is_bounded_by_size_and_age():
    now = [0.0]
    c = OutcomeCache(size=2, ttl=10, clock=lambda: now[0])
    for rid in "abc":
        c.put(Outcome(rid, False, b""))
    assert c.get("a") is None and c.get("b") and len(c) == 2
    now[0] = 11
    assert c.get("c") is None

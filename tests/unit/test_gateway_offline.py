"""The HTTP gateway's parts that need no broker: signed request ids, per-tenant quotas, API
keys and open mode, the bounded outcome cache; and the app itself where the broker is not
reached (or faked): /readyz and the tokenizer loaded at start-up, OpenAI error shapes of bad
bodies, what the request metrics count. tests/broker/test_gateway.py runs the gateway against
a real broker and a real worker."""
from __future__ import annotations

import logging
import time

import pytest
from fastapi.testclient import TestClient

from inferlog.errors import ConfigError
from inferlog.producer import openai_api as oai
from inferlog.producer.aio import AsyncProducer
from inferlog.producer.auth import AuthError, Authenticator, IdSigner, QuotaExceeded, Quotas, parse_api_keys
from inferlog.producer.gateway import create_app
from inferlog.producer.replies import Outcome, OutcomeCache, Replies
from inferlog.producer.sync import ProduceError
from inferlog.settings import default_model_path, load_settings
from support import wait_until


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


def test_quotas_count_each_model_apart():
    """A tenant's backlog on one model leaves its quota on another whole (isolation, issue 26)."""
    q = Quotas(rate=0, burst=1, max_in_flight=2, ttl=60)
    for i in range(2):
        q.admit("a", "slow-model")
        q.track(f"s{i}", "a", "slow-model")
    with pytest.raises(QuotaExceeded, match="in flight for model 'slow-model'"):
        q.admit("a", "slow-model")
    q.admit("a", "fast-model")  # the other model's quota is untouched
    q.track("f0", "a", "fast-model")
    q.done("s0")
    q.admit("a", "slow-model")
    assert q.in_flight == {("a", "slow-model"): 1, ("a", "fast-model"): 1}


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


# -- the app without a broker: its Kafka clients faked where a test needs it started ----------------
KEYS = "key-a:tenant-a,key-b:tenant-b"
A, B = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
JSON = {"content-type": "application/json"}


def app_client(**overrides) -> TestClient:
    """The gateway's app, not started (no lifespan: its Kafka clients are never used): what is
    refused before a request reaches Kafka (credentials, bodies) answers as it does live."""
    return TestClient(create_app(load_settings(api_keys=KEYS, **overrides)))


@pytest.fixture
def fake_kafka(monkeypatch):
    """The gateway starts with its Kafka clients faked: connected at once, a publish refused (503)."""
    async def nothing(self, *a, **kw):
        return None

    async def refused(self, *a, **kw):
        raise ProduceError("no broker in a unit test", "UNAVAILABLE")

    for cls in (Replies, AsyncProducer):
        monkeypatch.setattr(cls, "start", nothing)
        monkeypatch.setattr(cls, "stop", nothing)
    monkeypatch.setattr(Replies, "watch", nothing)
    monkeypatch.setattr(Replies, "running", property(lambda self: True))
    monkeypatch.setattr(AsyncProducer, "started", property(lambda self: True))
    monkeypatch.setattr(AsyncProducer, "submit", refused)


def test_ready_waits_for_the_tokenizer_loaded_at_start_up_not_by_the_first_call(fake_kafka, tokenizer_loads):
    loads, release = tokenizer_loads
    model = default_model_path()
    with app_client(model=model) as c:  # started: the lifespan runs Gateway.start
        wait_until(lambda: loads, timeout=30, what="the tokenizer's load to begin at start-up")
        r = c.get("/readyz")
        assert r.status_code == 503 and "tokenizer" in r.json()["detail"], r.text  # the Problem shape
        release.set()
        wait_until(lambda: c.get("/readyz").status_code == 200, timeout=30, what="/readyz to say ready")
        assert c.get("/readyz").json()["tokenizer"] == "loaded"
        assert loads == [model]
        # the first OpenAI call after ready: its tokens counted by the loaded tokenizer, then refused
        # by the (faked) broker; nothing loaded on the way
        r = c.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "a first call"}, headers=A)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text
        assert loads == [model]


def test_a_tokenizer_that_fails_to_load_is_reported_and_the_gateway_stays_up(fake_kafka, tmp_path, caplog):
    missing = str(tmp_path / "no-such-model")
    with caplog.at_level(logging.ERROR, logger="inferlog.producer.openai_api"), app_client(model=missing) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, timeout=30, what="/readyz to say ready")
        status = c.get("/readyz").json()["tokenizer"]
        assert status.startswith(f"unavailable from {missing}: "), status
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                   headers=A)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template", r.text
        assert c.post("/v1/requests", json={"task": "embed", "inputs": "x"}, headers=A).status_code == 503  # on to Kafka
    assert any("no tokenizer from" in m and "no-such-model" in m for m in caplog.messages), caplog.messages


@pytest.mark.parametrize("url", [oai.EMBEDDINGS, oai.COMPLETIONS, oai.CHAT])
def test_a_body_that_is_not_json_is_a_400_with_param_null(url):
    raw = b'{"model": "m", "input": ["a", "b",'
    r = app_client().post(url, content=raw, headers={**A, **JSON})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] is None and err["type"] == "invalid_request_error"  # was "34", the offset
    assert "not valid JSON" in err["message"] and f"character {len(raw)}" in err["message"], err


@pytest.mark.parametrize("url, body, param", [
    (oai.CHAT, {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (oai.CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "robot"}]}, "messages[1].role"),
    (oai.CHAT, {"model": "m", "messages": []}, "messages"),
    (oai.EMBEDDINGS, {"model": "m", "input": ["fine", 7]}, "input[1]"),
    (oai.COMPLETIONS, {"model": "m", "prompt": "x", "stop": ["ok", 3]}, "stop[1]"),
    (oai.COMPLETIONS, {"model": "m", "prompt": "x", "logit_bias": {"50256": "high"}}, "logit_bias.50256"),
    (oai.EMBEDDINGS, ["not", "an", "object"], None),
])
def test_param_names_the_fields_path(url, body, param):
    r = app_client().post(url, json=body, headers=A)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    if param is not None:  # a batch line's body is judged the same way
        assert _batch_param(url, body) == param


def _batch_param(url, body):
    with pytest.raises(oai.OpenAIError) as e:
        oai.parse_body(url, body)
    return e.value.param


def test_every_answered_submission_is_counted_401_under_unauthenticated_a_bad_body_under_its_tenant():
    c = app_client()
    bad_json = {"content": b'{"task": ', "headers": {**A, **JSON}}
    assert c.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers={"X-API-Key": "nope"}).status_code == 401
    assert c.post("/v1/requests", json={"task": "embed", "inputs": "x"}).status_code == 401
    # the credentials come first, even when the body is not JSON (FastAPI parses it before them)
    r = c.post("/v1/chat/completions", content=b"{", headers={**JSON, "Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    assert c.post("/v1/embeddings", **bad_json).status_code == 400
    assert c.post("/v1/requests", json={"task": "embed"}, headers=B).status_code == 422
    assert c.post("/v1/requests", content=b"[1,", headers={**B, **JSON}).status_code == 422
    assert c.get("/v1/requests/no-such-id", headers=A).status_code == 404  # a poll: not a submission
    text = c.get("/metrics").text
    counted = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("inferlog_gateway_requests_total{")}
    assert counted == {
        'inferlog_gateway_requests_total{code="401",model="unknown",tenant="unauthenticated",tier="unknown"}': 3.0,
        'inferlog_gateway_requests_total{code="400",model="unknown",tenant="tenant-a",tier="unknown"}': 1.0,
        'inferlog_gateway_requests_total{code="422",model="unknown",tenant="tenant-b",tier="unknown"}': 2.0,
    }, text

"""The HTTP gateway against the real broker and a real worker (the default MiniLM): submit and
poll, wait mode, validation, tenants (API keys, HS256/RS256 JWTs), quotas, priority tiers, trace
propagation, offline docs, and a schemathesis fuzz of the OpenAPI spec
(tests/unit/test_gateway_offline.py: the parts that need no broker)."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jwt
import pytest
import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, settings as hsettings
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from inferlog.codec import RESULT, Codec
from inferlog.consumer.runners import load_runner
from inferlog.producer.gateway import create_app, serve_in_thread
from inferlog.producer.sync import Producer
from inferlog.settings import Settings, default_model_path, load_settings
from inferlog.topics import ensure_topics
from support import announced, decode_request, read_all, running_worker, wait_until

KEYS = "key-a:tenant-a,key-b:tenant-b"
A, B = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
HS_SECRET = "a-test-secret-of-at-least-32-bytes!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
EMBED = {"task": "embed", "inputs": ["the parcel arrived damaged"]}


def fresh_settings(bootstrap: str, **overrides) -> Settings:
    """Settings on topics of their own (the conftest fixture is per test; these are per module)."""
    tag = f"gw-{time.time_ns()}"
    s = load_settings(bootstrap_servers=bootstrap, requests_topic=f"{tag}.requests",
                      high_priority_topic=f"{tag}.requests.high", results_topic=f"{tag}.results",
                      deadletter_topic=f"{tag}.deadletter", models_topic=f"{tag}.models", partitions=3,
                      group_id=f"{tag}.workers",
                      worker_id=f"{tag}.w0", **overrides)
    ensure_topics(s)
    return s


@pytest.fixture(scope="module")
def runner():
    return load_runner(default_model_path(), device="cpu")


@pytest.fixture(scope="module")
def stack(kafka, runner):
    """A worker and a gateway (keys, HS256 and RS256) on the same fresh topics."""
    s = fresh_settings(kafka.bootstrap, api_keys=KEYS, jwt_secret=HS_SECRET, jwt_public_key=RSA_PUBLIC,
                       gateway_max_wait_s=10, max_wait_ms=5, tenant_rate=1000, tenant_burst=1000,
                       gateway_id_secret="replicas-share-this")
    with running_worker(s, runner), serve_in_thread(s) as url:
        yield s, url


@pytest.fixture
def client(stack):
    with httpx.Client(base_url=stack[1], timeout=30) as c:
        yield c


def poll(client: httpx.Client, rid: str, headers: dict, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/requests/{rid}", headers=headers)
        assert r.status_code == 200, r.text
        if r.json()["status"] != "pending":
            return r.json()
        time.sleep(0.2)
    raise TimeoutError(f"{rid} still pending after {timeout}s")


def test_submit_then_poll_returns_the_result(client):
    r = client.post("/v1/requests", json=EMBED, headers=A)
    assert r.status_code == 202, r.text
    rid = r.json()["request_id"]
    assert r.json()["status"] == "pending" and r.headers["location"] == f"/v1/requests/{rid}"
    body = poll(client, rid, A)
    assert body["status"] == "done"
    res = body["result"]
    assert res["request_id"] == rid and res["tenant"] == "tenant-a" and res["status"] == "OK"
    assert len(res["outputs"][0]["vector"]) == 384


def test_wait_mode_answers_with_the_result(client):
    r = client.post("/v1/requests", params={"wait": 10}, json={**EMBED, "inputs": ["one", "two"]}, headers=B)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "done" and len(r.json()["result"]["outputs"]) == 2


def test_a_dead_letter_is_reported_as_failed(client):
    # the gateway counts no tokens: the worker finds the text too long for its model, and says so
    r = client.post("/v1/requests", params={"wait": 10}, json={**EMBED, "inputs": "word " * 700}, headers=A)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed" and r.json()["reason"] == "INPUT_TOO_LARGE"
    assert poll(client, r.json()["request_id"], A)["reason"] == "INPUT_TOO_LARGE"


def test_a_request_naming_no_model_is_checked_as_the_gateways_own(client):
    # it goes to the gateway's model's topics, so the gateway knows that model does not generate
    r = client.post("/v1/requests", params={"wait": 10}, json={**EMBED, "task": "generate"}, headers=A)
    assert r.status_code == 400 and r.json()["detail"]["reason"] == "UNSUPPORTED_TASK", r.text


def test_a_model_no_worker_announces_is_404_before_anything_is_published(client, stack):
    s, _ = stack
    r = client.post("/v1/requests", params={"wait": 10}, json={**EMBED, "model": "no-such-model"}, headers=A)
    assert r.status_code == 404, r.text
    assert r.json()["detail"]["reason"] == "UNKNOWN_MODEL" and "all-MiniLM-L6-v2" in r.json()["detail"]["detail"]
    ok = client.post("/v1/requests", params={"wait": 10}, json={**EMBED, "model": "all-MiniLM-L6-v2"}, headers=A)
    assert ok.status_code == 200 and ok.json()["status"] == "done", ok.text  # the worker's model, as it announced it
    codec = Codec.from_settings(s)
    published = [decode_request(codec, rec)["model"] for t in s.request_topics for rec in read_all(s, t)]
    assert "all-MiniLM-L6-v2" in published and "no-such-model" not in published


@pytest.mark.parametrize("body, reason, needle", [
    ({"task": "embed"}, "INVALID_REQUEST", "inputs"),
    ({**EMBED, "inputs": ["fine", "  "]}, "INVALID_REQUEST", "inputs[1] is empty"),
    ({**EMBED, "task": "translate"}, "INVALID_REQUEST", "task must be one of"),
    ({**EMBED, "inputs": ["x"] * 65}, "INPUT_TOO_LARGE", "max_inputs"),
    ({**EMBED, "parameters": {"temperature": 99}}, "INVALID_REQUEST", "temperature"),
    ({**EMBED, "tenant": "tenant-b"}, "INVALID_REQUEST", "tenant"),  # the body cannot pick its tenant
])
def test_bad_bodies_are_422_with_the_reason(client, body, reason, needle):
    r = client.post("/v1/requests", json=body, headers=A)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["reason"] == reason and needle in r.text


def test_tenants_see_only_their_own_requests(client):
    rid = client.post("/v1/requests", json=EMBED, headers=A).json()["request_id"]
    assert client.get(f"/v1/requests/{rid}", headers=A).status_code == 200
    other = client.get(f"/v1/requests/{rid}", headers=B)
    unknown = client.get("/v1/requests/0190c0de-0000-7000-8000-000000000000.abc", headers=B)
    assert other.status_code == unknown.status_code == 404
    assert other.json() == unknown.json()  # nothing tells "someone else's" from "no such id"
    assert client.get(f"/v1/requests/{rid}").status_code == 401
    assert client.post("/v1/requests", json=EMBED, headers={"X-API-Key": "nope"}).status_code == 401


def test_any_replica_answers_any_id_even_from_before_it_started(client, stack):
    s, _ = stack
    done = client.post("/v1/requests", params={"wait": 10}, json=EMBED, headers=A).json()
    assert done["status"] == "done"
    # a second replica starts after that result was written: it finds it in the results log
    with serve_in_thread(s) as url2, httpx.Client(base_url=url2, timeout=30) as c2:
        again = c2.get(f"/v1/requests/{done['request_id']}", headers=A).json()
        assert again["status"] == "done" and again["result"] == done["result"]
        assert c2.get(f"/v1/requests/{done['request_id']}", headers=B).status_code == 404
        # and one submitted to it is answered by the first
        rid = c2.post("/v1/requests", json=EMBED, headers=B).json()["request_id"]
        assert poll(client, rid, B)["status"] == "done"


def token(alg: str, **claims) -> str:
    key = HS_SECRET if alg == "HS256" else RSA_KEY
    return jwt.encode({"exp": int(time.time()) + 3600, **claims}, key, algorithm=alg)


@pytest.mark.parametrize("alg", ["HS256", "RS256"])
def test_jwt_bearer_tokens_name_the_tenant(client, alg):
    bearer = {"Authorization": f"Bearer {token(alg, tenant='tenant-a')}"}
    r = client.post("/v1/requests", params={"wait": 10}, json=EMBED, headers=bearer)
    assert r.status_code == 200 and r.json()["result"]["tenant"] == "tenant-a"
    # the same tenant by API key sees it; the other does not
    assert client.get(f"/v1/requests/{r.json()['request_id']}", headers=A).status_code == 200
    assert client.get(f"/v1/requests/{r.json()['request_id']}", headers=B).status_code == 404


@pytest.mark.parametrize("bad, status", [
    (token("HS256", tenant="tenant-a", exp=int(time.time()) - 10), 401),  # expired
    # built when the tests are collected: "not yet valid" must stay so however long the suite
    # takes to get here (+600 s became valid in a slow run), and a wrong signature must not expire
    (token("HS256", tenant="tenant-a", nbf=int(time.time()) + 10 * 365 * 86400), 401),  # not yet valid
    (jwt.encode({"tenant": "tenant-a", "exp": int(time.time()) + 10 * 365 * 86400}, "another-secret-of-32-bytes-length!",
                algorithm="HS256"), 401),  # wrong signature
    (jwt.encode({"tenant": "tenant-a"}, HS_SECRET, algorithm="HS256"), 401),  # no exp
    (token("RS256", sub="someone"), 403),  # valid, but names no tenant
    ("not.a.jwt", 401),
])
def test_bad_tokens_are_refused(client, bad, status):
    r = client.post("/v1/requests", json=EMBED, headers={"Authorization": f"Bearer {bad}"})
    assert r.status_code == status, r.text
    assert r.headers["www-authenticate"] == "Bearer"


def test_metrics_count_by_tier_and_tenant(client, stack):
    s, _ = stack
    assert client.post("/v1/requests", json={**EMBED, "priority": s.high_priority}, headers=B).status_code == 202
    text = client.get("/metrics").text
    # a request naming no model goes to (and is counted for) the gateway's own
    assert f'inferlog_gateway_requests_total{{code="202",model="{s.served_name}",tenant="tenant-b",tier="high"}}' in text
    assert "inferlog_gateway_event_loop_lag_seconds_count" in text
    assert "inferlog_gateway_latency_seconds_bucket" in text


def test_metrics_count_refused_credentials_and_bad_bodies(client):
    def counted(code: str, tenant: str) -> float:
        key = f'inferlog_gateway_requests_total{{code="{code}",model="unknown",tenant="{tenant}",tier="unknown"}} '
        return next((float(x[len(key):]) for x in client.get("/metrics").text.splitlines() if x.startswith(key)), 0.0)

    before = counted("401", "unauthenticated"), counted("422", "tenant-a")
    assert client.post("/v1/requests", json=EMBED, headers={"X-API-Key": "nope"}).status_code == 401
    assert client.post("/v1/requests", content=b"{", headers={"content-type": "application/json"}).status_code == 401
    assert client.post("/v1/requests", content=b"{", headers={**A, "content-type": "application/json"}).status_code == 422
    assert (counted("401", "unauthenticated"), counted("422", "tenant-a")) == (before[0] + 2, before[1] + 1)


# -- tracing ---------------------------------------------------------------------------------------
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def trace_ids(headers: list) -> tuple[str, str]:
    """(trace id, parent span id) of a record's traceparent header."""
    _, trace_id, span_id, _ = dict(headers)["traceparent"].decode().split("-")
    return trace_id, span_id


def test_a_callers_traceparent_runs_through_kafka_to_the_result(stack):
    s, _ = stack
    # A provider of the test's own, handed to this replica: the global one can be set only once
    # per process, and test_observability's worker spans need it.
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    with serve_in_thread(s, tracer_provider=provider) as url, httpx.Client(base_url=url, timeout=30) as c:
        traced = c.post("/v1/requests", params={"wait": 10}, json=EMBED,
                        headers={**A, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        garbled = c.post("/v1/requests", json=EMBED, headers={**A, "traceparent": "00-not-a-trace-01"})
    assert traced.status_code == 200 and traced.json()["status"] == "done", traced.text
    assert garbled.status_code == 202, garbled.text  # an unreadable traceparent starts a new trace
    rid, garbled_rid = traced.json()["request_id"], garbled.json()["request_id"]

    finished = spans.get_finished_spans()
    publish = {sp.attributes["inferlog.request_id"]: sp for sp in finished if sp.name == "inferlog.publish"}
    server = {sp.context.span_id: sp for sp in finished if sp.kind == SpanKind.SERVER}
    # the gateway's server span continues the caller's span; the publish is its child
    http = server[publish[rid].parent.span_id]
    assert format(http.context.trace_id, "032x") == CALLER_TRACE
    assert http.parent.is_remote and format(http.parent.span_id, "016x") == CALLER_SPAN
    assert publish[rid].kind == SpanKind.PRODUCER and http.attributes["http.route"] == "/v1/requests"

    codec = Codec.from_settings(s)
    requests = {decode_request(codec, r)["request_id"]: r for r in read_all(s, s.tier_topic("normal"))}
    # the record names the publish span, in the caller's trace
    assert trace_ids(requests[rid].headers) == (CALLER_TRACE, format(publish[rid].context.span_id, "016x"))
    results = {codec.decode(r.value, expect=RESULT)["request_id"]: r for r in read_all(s, s.model_results_topic)}
    assert trace_ids(results[rid].headers)[0] == CALLER_TRACE  # the worker carried it on

    # the garbled one: a fresh root trace of the gateway's own, still on the record
    fresh = server[publish[garbled_rid].parent.span_id]
    assert fresh.parent is None and format(fresh.context.trace_id, "032x") != CALLER_TRACE
    assert trace_ids(requests[garbled_rid].headers)[0] == format(fresh.context.trace_id, "032x")


# -- docs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_the_gateway(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert any(a.endswith(".js") for a in assets), r.text
    assert all(a.startswith("/") and not a.startswith("//") for a in assets), assets  # no CDN
    kinds = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for a in assets:
        got = client.get(a)
        assert got.status_code == 200 and got.content, a
        assert got.headers["content-type"].startswith(kinds[a[a.rindex("."):]]), (a, got.headers["content-type"])
    if page == "/docs":
        assert any(a.endswith(".css") for a in assets)
        assert "SwaggerUIBundle" in client.get(next(a for a in assets if a.endswith(".js"))).text


@pytest.mark.parametrize("limits, what", [
    ({"tenant_rate": 0.5, "tenant_burst": 2}, "requests/s"),
    ({"tenant_rate": 0, "tenant_max_in_flight": 2}, "in flight"),
])
def test_quotas_answer_429_with_retry_after(kafka, limits, what):
    # the model announced, no worker behind it: what is submitted stays in flight
    s = fresh_settings(kafka.bootstrap, api_keys=KEYS, **limits)
    with announced(s), serve_in_thread(s) as url, httpx.Client(base_url=url, timeout=30) as c:
        codes = [c.post("/v1/requests", json=EMBED, headers=A).status_code for _ in range(3)]
        assert codes == [202, 202, 429]
        r = c.post("/v1/requests", json=EMBED, headers=A)
        assert r.status_code == 429 and what in r.text and int(r.headers["retry-after"]) >= 1
        assert c.post("/v1/requests", json=EMBED, headers=B).status_code == 202  # per tenant


def test_high_priority_overtakes_a_flood_of_normal_requests(kafka, runner):
    """1500 normal requests wait before the worker starts; 5 high-priority ones sent once it is
    busy with them finish before most of the flood (an ordering, not a timing bound)."""
    s = fresh_settings(kafka.bootstrap, max_in_flight=64, max_batch_size=32, max_wait_ms=5)
    with Producer(s) as p:
        p.submit_many([{"task": "embed", "inputs": f"queued text number {i}"} for i in range(1500)])
    committed = []
    with running_worker(s, runner, on_commit=committed.extend), Producer(s) as p:
        wait_until(lambda: len(committed) >= 100, what="the worker to be busy with the flood")
        with ThreadPoolExecutor(5) as pool:
            high = list(pool.map(lambda i: p.infer("embed", f"urgent {i}", priority=s.high_priority, timeout=60),
                                 range(5)))
        time.sleep(1)  # let commits of anything completed alongside settle
        codec = Codec.from_settings(s)
        done = [codec.decode(r.value, expect=RESULT) for r in read_all(s, s.model_results_topic)]
    high_ids = {h["request_id"] for h in high}
    last_high = max(h["timings"]["completed_at"] for h in high)
    before = sum(1 for r in done if r["request_id"] not in high_ids and r["timings"]["completed_at"] <= last_high)
    assert all(h["source"]["topic"] == s.tier_topic("high") for h in high)
    assert 100 <= before < 750, f"{before} of 1500 normal requests finished before the last high-priority one"


# -- fuzzing the OpenAPI spec --------------------------------------------------------------------
# The spec comes from an app that is never started (building it needs no broker); the cases
# go to the running stack. (schemathesis.pytest.from_fixture does not work with pytest 9.)
fuzzed = schemathesis.openapi.from_dict(create_app(load_settings(api_keys=KEYS)).openapi())


@fuzzed.parametrize()
@hsettings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_the_api_no_server_errors(case, stack):
    # about 100 calls in all (schemathesis adds negative and method cases); valid bodies are really published and answered
    response = case.call(base_url=stack[1], headers=A, timeout=30)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"

"""Metrics, tracing and health of a worker running against the real broker."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from inferlog.codec import REQUEST, Codec
from inferlog.consumer.runners import load_runner
from inferlog.consumer.worker import Worker
from inferlog.producer.sync import Producer
from inferlog.request import build_request
from inferlog.settings import DEFAULT_NAME, default_model_path
from conftest import free_port
from support import account, output_count, produce_raw, read_all, running_worker, wait_until

SPANS = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracing():
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(SPANS))
    trace.set_tracer_provider(provider)  # once per process; the worker's tracer resolves to it
    yield


@pytest.fixture(scope="module")
def runner():
    return load_runner(default_model_path(), device="cpu")


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def samples(port: int, model: str = DEFAULT_NAME) -> dict[tuple[str, tuple], float]:
    """{(name, labels less model): value}; every series carries the worker's model."""
    code, body = get(port, "/metrics")
    assert code == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            labels = dict(s.labels)
            assert labels.pop("model", None) == model, (s.name, s.labels)
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def test_metrics_match_what_was_processed(broker_settings, runner):
    codec = Codec.from_settings(broker_settings)
    good = [codec.encode(REQUEST, build_request("embed", f"text number {i}")) for i in range(60)]
    values = [(None, v) for v in good] + [(None, b"\x01junk")] * 3
    produce_raw(broker_settings, values)
    s = broker_settings.with_overrides(metrics_port=free_port(), max_batch_size=8)
    with running_worker(s, runner) as w:
        wait_until(lambda: output_count(s) >= len(values), what="all outputs")
        wait_until(lambda: samples(s.metrics_port).get(("inferlog_results_total", (("status", "OK"),))) == 60,
                   what="the results counter")
        # lag is sampled every couple of seconds: wait for a sample that saw everything consumed
        wait_until(lambda: (lags := [v for k, v in samples(s.metrics_port).items()
                                     if k[0] == "inferlog_consumer_lag"]) and not any(lags), what="lag 0")
        m = samples(s.metrics_port)
    acc = account(s)
    acc.assert_exactly_once()
    batches = {r["batch"]["batch_id"] for r in acc.results}
    assert m[("inferlog_records_consumed_total", ())] == 63
    assert m[("inferlog_dead_letters_total", (("reason", "UNDECODABLE"),))] == 3
    assert m[("inferlog_batch_size_count", ())] == len(batches)
    assert m[("inferlog_batch_size_sum", ())] == 60
    assert m[("inferlog_end_to_end_seconds_count", (("tier", "normal"),))] == 60  # junk has no created_at
    assert m[("inferlog_stage_seconds_count", (("stage", "infer"),))] == len(batches)
    assert m[("inferlog_stage_seconds_count", (("stage", "queue"),))] == 60
    assert m[("inferlog_commits_total", (("outcome", "ok"),))] == w.counts["commits"] > 0
    assert m[("inferlog_tokens_total", ())] > 60
    assert m[("inferlog_ready", ())] == 1
    lags = {k: v for k, v in m.items() if k[0] == "inferlog_consumer_lag"}
    assert lags and all(v == 0 for v in lags.values())  # all consumed
    assert ("inferlog_executor_queue_wait_seconds_count", (("executor", "device"),)) in m


def test_trace_context_links_batches_and_reaches_the_results(broker_settings, runner):
    tracer = trace.get_tracer("test.upstream")
    ids = {}
    with Producer(broker_settings) as p:
        for i in range(5):
            with tracer.start_as_current_span(f"upstream-{i}") as span:
                ids[p.submit("embed", f"traced request {i}")] = span.get_span_context().trace_id
    SPANS.clear()
    with running_worker(broker_settings, runner):
        wait_until(lambda: output_count(broker_settings) >= 5, what="results")
    linked = {link.context.trace_id for sp in SPANS.get_finished_spans() if sp.name == "inferlog.batch"
              for link in sp.links}
    assert set(ids.values()) <= linked
    stages = {sp.name for sp in SPANS.get_finished_spans()}
    assert {"inferlog.prepare", "inferlog.infer", "inferlog.finish"} <= stages
    results = read_all(broker_settings, broker_settings.model_results_topic)
    codec = Codec.from_settings(broker_settings)
    for r in results:
        rid = codec.decode(r.value)["request_id"]
        tp = dict(r.headers)["traceparent"].decode()
        assert int(tp.split("-")[1], 16) == ids[rid]


class GatedRunner:
    """The real runner, whose warm-up waits for the test's word."""

    def __init__(self, inner):
        self.inner, self.gate = inner, threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def warmup(self):
        assert self.gate.wait(60)
        self.inner.warmup()


def test_ready_only_after_warmup_and_assignment(broker_settings, runner):
    s = broker_settings.with_overrides(metrics_port=free_port())
    gated = GatedRunner(runner)
    w = Worker(s, gated)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        code, body = get(s.metrics_port, "/readyz")
        assert code == 503 and json.loads(body)["ready"] is False
        assert get(s.metrics_port, "/healthz")[0] == 200
        gated.gate.set()
        wait_until(lambda: get(s.metrics_port, "/readyz")[0] == 200, what="ready")
        assert w.ready.is_set() and w.engine.partitions
        assert get(s.metrics_port, "/nope")[0] == 404
    finally:
        gated.gate.set()
        w.stop()
        t.join(60)
    assert not t.is_alive()


def test_json_logs_carry_ids_as_fields():
    import logging

    from inferlog.telemetry import JsonFormatter

    rec = logging.LogRecord("inferlog.x", logging.WARNING, __file__, 1, "request %s failed", ("r1",), None)
    rec.request_id, rec.batch_id = "r1", "b7"
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == "request r1 failed" and out["level"] == "WARNING"
    assert out["request_id"] == "r1" and out["batch_id"] == "b7"

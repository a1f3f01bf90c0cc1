"""Metrics labelled by model, without a broker: every series a worker exports carries its served
name; the gateway labels a submission with the model it names only when it knows that model
(else "unknown": a client's string is no series of its own); the Grafana dashboard filters and
splits every panel by model.

Broker tests that read these metrics: tests/broker/test_observability.py (a worker's /metrics,
by exact labels), tests/broker/test_gateway.py (the gateway's /metrics text), and, in process
through `Metrics.registry` (unlabelled, so unchanged), test_lag.py and test_committer.py."""
from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferlog.consumer.metrics import HealthServer, Metrics
from inferlog.producer.gateway import UNKNOWN_MODEL, GatewayMetrics, create_app
from inferlog.registry import EXPIRY_INTERVALS, Member, request_directory
from inferlog.settings import Settings, load_settings
from test_gateway_offline import fake_kafka  # noqa: F401  (fixture: publishes refused)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "inferlog.json"
T0 = 1_800_000_000_000  # epoch ms


def exported(metrics: Metrics) -> list:
    """Every sample /metrics would serve."""
    text = generate_latest(metrics.exported).decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def busy(m: Metrics) -> None:
    """A sample of every family, labelled ones included (and lag for a partition)."""
    m.consumed.inc(3)
    m.results.labels("OK").inc()
    m.dead_letters.labels("UNDECODABLE").inc()
    m.batch_size.observe(2)
    m.batch_tokens.observe(100)
    m.stage.labels("infer").observe(0.01)
    m.e2e.labels("normal").observe(0.2)
    m.lag.labels("inferlog.requests.minilm", "0").set(7)
    m.in_flight.set(1)
    m.held.labels("high").set(0)
    m.paused.labels("normal").set(0)
    m.queue_wait.labels("cpu").observe(0.001)
    m.tokens.inc(42)
    m.ready.set(1)
    m.device_memory.set(0)
    m.device_util.set(0)


# -- the worker ------------------------------------------------------------------------------------

def test_every_worker_series_is_exported_under_the_served_name():
    s = Settings(model_name="minilm")
    m = Metrics(model=s.served_name)
    busy(m)
    samples = exported(m)
    names = {x.name for x in samples}
    assert {"inferlog_records_consumed_total", "inferlog_consumer_lag", "inferlog_stage_seconds_bucket",
            "inferlog_ready"} <= names
    assert samples and all(x.labels.get("model") == "minilm" for x in samples), \
        [x for x in samples if x.labels.get("model") != "minilm"]
    # the labels of its own are kept beside it
    lag = [x for x in samples if x.name == "inferlog_consumer_lag"]
    assert [(x.labels, x.value) for x in lag] == [
        ({"topic": "inferlog.requests.minilm", "partition": "0", "model": "minilm"}, 7.0)]
    text = generate_latest(m.exported).decode()
    assert 'inferlog_results_total{model="minilm",status="OK"} 1.0' in text
    assert 'inferlog_records_consumed_total{model="minilm"} 3.0' in text


def test_in_process_readers_and_the_family_list_see_the_worker_registry_unlabelled():
    """registry.get_sample_value (test_lag.py, test_committer.py) matches labels exactly: the
    label is added on export only, and the families and their types are the same as before."""
    m = Metrics(model="minilm")
    busy(m)
    assert m.registry.get_sample_value("inferlog_consumer_lag",
                                       {"topic": "inferlog.requests.minilm", "partition": "0"}) == 7
    assert m.registry.get_sample_value("inferlog_commits_total", {"outcome": "ok"}) == 0
    assert m.exported.get_sample_value("inferlog_commits_total", {"outcome": "ok", "model": "minilm"}) == 0
    assert [(f.name, f.type) for f in m.registry.collect()] == [(f.name, f.type) for f in m.exported.collect()]
    # a lag series forgotten (a partition revoked) is gone from the export too
    m.lag.remove("inferlog.requests.minilm", "0")
    assert not [x for x in exported(m) if x.name == "inferlog_consumer_lag"]


def test_without_a_model_nothing_is_added():
    m = Metrics()
    m.ready.set(1)
    assert all("model" not in x.labels for x in exported(m))
    m.model = "late"  # bound after construction: the next scrape carries it
    assert all(x.labels["model"] == "late" for x in exported(m))


def test_the_health_server_serves_the_labelled_series():
    m = Metrics(model="minilm")
    m.ready.set(1)
    http = HealthServer(0, m, lambda: (True, ""), lambda: (True, ""), host="127.0.0.1").start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        http.stop()
    assert 'inferlog_ready{model="minilm"} 1.0' in text, text


def test_the_worker_binds_its_served_name(monkeypatch):
    from inferlog.consumer import worker as worker_module

    seen = []

    class Engine:  # not the real one: this test is about the metrics the worker builds
        def __init__(self, settings, runner, codec, metrics):
            seen.append(metrics)

    monkeypatch.setattr(worker_module, "Engine", Engine)
    w = worker_module.Worker(Settings(model_name="minilm", stages="inline"), runner=None)
    assert w.metrics.model == "minilm" and seen == [w.metrics]


def test_the_lag_sampler_reads_the_models_own_group(monkeypatch):
    import confluent_kafka.admin

    import inferlog.committed
    from inferlog.consumer.metrics import LagSampler

    groups = []

    class Reader:  # a group_reader's consumer, never asked here
        def close(self) -> None:
            pass

    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", lambda conf: object())
    monkeypatch.setattr(inferlog.committed, "group_reader", lambda settings, group: groups.append(group) or Reader())
    s = Settings(model_name="minilm")
    sampler = LagSampler(s, Metrics(model=s.served_name).lag)
    try:
        assert groups == [s.worker_group]
        if s.topic_layout != "shared":
            assert s.worker_group != s.group_id
    finally:
        sampler.close()
        sampler.thread.join(5)


# -- the gateway -----------------------------------------------------------------------------------

def member(name: str, topics, at: int = T0) -> Member:
    return Member(name=name, worker_id="w0", task="embed", revision=None, digest="abc", limits={},
                  chat_template=None, model=f"/models/{name}", topics=list(topics), group="g", host="h",
                  started_at=at, heartbeat_at=at, announce_interval_s=10.0)


def directory(s: Settings, *names: str, clock=lambda: T0):
    d = request_directory(s, clock=clock)
    for name in names:
        m = member(name, s.model_topics(name))
        d.apply(m.key, m.to_json())
    return d


def test_the_gateway_labels_a_known_model_by_name_and_anything_else_unknown():
    s = Settings(model_name="gw-default")
    now = [T0]
    d = directory(s, "minilm", clock=lambda: now[0])
    label = GatewayMetrics.model_label
    assert label(None, s.served_name, d) == "gw-default"  # names none: goes to the default
    assert label("gw-default", s.served_name, d) == "gw-default"  # the default, live or not
    assert label("minilm", s.served_name, d) == "minilm"  # live in the directory
    for junk in ("MiniLM", "no-such-model", "", "x" * 500, 'a"b\nc{d}'):
        assert label(junk, s.served_name, d) == UNKNOWN_MODEL == "unknown"
    now[0] += EXPIRY_INTERVALS * 10_000 + 1  # its last worker gone: no longer a model it knows
    assert label("minilm", s.served_name, d) == "unknown"


def test_the_gateway_labels_a_model_named_by_its_files_with_its_served_name():
    s = Settings(model_name="gw-default", topic_layout="shared")  # where a request may name the files
    m = member("minilm", s.model_topics("minilm"))
    d = request_directory(s, clock=lambda: T0)
    d.apply(m.key, m.to_json())
    assert GatewayMetrics.model_label("/models/minilm", s.served_name, d) == "minilm"


def test_the_gateway_metric_families_carry_model():
    g = GatewayMetrics()
    assert g.requests._labelnames == ("tier", "tenant", "code", "model")
    assert g.latency._labelnames == ("tier", "model")


def test_submissions_are_counted_under_the_model_they_reach(fake_kafka):
    app = create_app(load_settings(api_keys="key-a:tenant-a", model_name="gw-default"))
    gw = app.state.gateway
    m = member("minilm", gw.s.model_topics("minilm"), at=int(time.time() * 1000))
    gw.models.apply(m.key, m.to_json())  # not read to its end: requests are not refused for their model
    c = TestClient(app)
    key = {"X-API-Key": "key-a"}
    for model in (None, "gw-default", "minilm", "minilm", "whatever-a-client-sends"):
        body = {"task": "embed", "inputs": "x"} | ({"model": model} if model else {})
        assert c.post("/v1/requests", json=body, headers=key).status_code == 503
    assert c.post("/v1/requests", json={"task": "embed", "inputs": "x", "model": "minilm"}).status_code == 401
    counted = {tuple(sorted(s.labels.items())): s.value
               for fam in text_string_to_metric_families(c.get("/metrics").text)
               for s in fam.samples if s.name == "inferlog_gateway_requests_total"}
    common = {"tier": "normal", "tenant": "tenant-a", "code": "503"}
    assert counted == {
        tuple(sorted((common | {"model": "gw-default"}).items())): 2.0,
        tuple(sorted((common | {"model": "minilm"}).items())): 2.0,
        tuple(sorted((common | {"model": "unknown"}).items())): 1.0,
        # refused before its body was read: no model is attributed
        tuple(sorted({"tier": "unknown", "tenant": "unauthenticated", "code": "401", "model": "unknown"}.items())): 1.0,
    }, counted


# -- the dashboard ---------------------------------------------------------------------------------
# Panels whose queries are deliberately not per model: none (every worker series carries model).
GLOBAL_PANELS: set[str] = set()


def _targets(dash: dict):
    return [(p["title"], t) for p in dash["panels"] for t in p.get("targets", [])]


def test_the_dashboard_has_a_model_variable_that_filters_the_workers():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query" and re.fullmatch(r"label_values\(inferlog_\w+, model\)", model["definition"])
    assert model["query"]["query"] == model["definition"]
    assert model["includeAll"] and model["multi"] and model["allValue"] == ".*"
    names = list(variables)
    assert names.index("model") < names.index("instance")  # the workers listed are the chosen models'
    assert 'model=~"$model"' in variables["instance"]["definition"]


def test_every_dashboard_panel_filters_and_splits_by_model():
    dash = json.loads(DASHBOARD.read_text())
    targets = _targets(dash)
    assert targets
    for title, t in targets:
        if title in GLOBAL_PANELS:
            continue
        expr = t["expr"]
        selectors = re.findall(r"\binferlog_\w+\{([^}]*)\}", expr)
        assert selectors and all('model=~"$model"' in sel for sel in selectors), (title, expr)
        # each aggregation keeps model, so a panel draws one series (or set) per model
        groupings = re.findall(r"\b(?:sum|max|min|avg)\s+by\s*\(([^)]*)\)", expr)
        assert groupings and all("model" in [g.strip() for g in grp.split(",")] for grp in groupings), (title, expr)
        assert "{{model}}" in t["legendFormat"], (title, t["legendFormat"])

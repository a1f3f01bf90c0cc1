"""Prometheus metrics of one worker, and its HTTP endpoints (/metrics, /healthz, /readyz).

Each worker owns its registry (several workers in one process, as in tests, do not mix).
Names are documented in the README; labels stay low-cardinality (no request ids).

Every series a worker exports carries `model="<served name>"` (several models share one
Prometheus and one dashboard). prometheus_client has no constant labels, so the label is added
where the series leave the process: `Metrics.exported`, the registry /metrics serves, relabels
each sample of `Metrics.registry` as it is collected. The metric objects and their call sites
keep their own labels, and in-process readers (`registry.get_sample_value`) match without it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)
# no `_created` series beside every counter and histogram: a timestamp per series nobody charts
disable_created_metrics()

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
E2E_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKENS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ModelLabelled:
    """A collector: every family of `metrics.registry`, each sample with `model` added (the
    value of `metrics.model` at collection time; nothing is added while it is None)."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def collect(self):
        model = self.metrics.model
        for family in self.metrics.registry.collect():
            if model is None:
                yield family
                continue
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**s.labels, "model": model}) for s in family.samples]
            yield out


class Metrics:
    """model: the served name the worker's series are exported under (settings.served_name)."""

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        # what /metrics serves: the registry below, each series labelled with the model
        self.exported = CollectorRegistry()
        self.exported.register(ModelLabelled(self))
        r = self.registry = CollectorRegistry()
        self.consumed = Counter("inferlog_records_consumed", "Records fetched from the requests topic", registry=r)
        self.results = Counter("inferlog_results", "Results committed, by status", ["status"], registry=r)
        self.dead_letters = Counter("inferlog_dead_letters", "Dead letters committed, by reason", ["reason"],
                                    registry=r)
        self.batch_size = Histogram("inferlog_batch_size", "Requests per batch", buckets=SIZES, registry=r)
        self.batch_tokens = Histogram("inferlog_batch_tokens", "Padded tokens per batch", buckets=TOKENS, registry=r)
        self.stage = Histogram("inferlog_stage_seconds", "Time in each stage (decode per chunk, queue per request, "
                               "prepare/infer/finish per batch, commit per transaction)", ["stage"],
                               buckets=SECONDS, registry=r)
        self.e2e = Histogram("inferlog_end_to_end_seconds", "From the request's created_at to its committed output",
                             ["tier"], buckets=E2E_SECONDS, registry=r)
        # what the group still owes: from the committed offset, not the fetch position (which runs
        # ahead by everything prefetched, held or in flight); topic too, as both tiers share numbers
        self.lag = Gauge("inferlog_consumer_lag", "Log end offset minus the group's committed offset (the log "
                         "start where nothing is committed yet), per assigned partition",
                         ["topic", "partition"], registry=r)
        self.in_flight = Gauge("inferlog_in_flight_records", "Records consumed and not yet committed", registry=r)
        self.held = Gauge("inferlog_held_records", "Records fetched past max_in_flight, waiting for room",
                          ["tier"], registry=r)
        self.paused = Gauge("inferlog_paused_partitions", "Partitions paused by back-pressure", ["tier"], registry=r)
        self.queue_wait = Histogram("inferlog_executor_queue_wait_seconds", "Wait for an executor thread",
                                    ["executor"], buckets=SECONDS, registry=r)
        self.tokens = Counter("inferlog_tokens", "Input tokens processed (not counting padding)", registry=r)
        self.commits = Counter("inferlog_commits", "Commits (transactions), by outcome", ["outcome"], registry=r)
        self.ready = Gauge("inferlog_ready", "1 when the model is warm and partitions are assigned", registry=r)
        self.device_memory = Gauge("inferlog_device_memory_bytes", "GPU memory allocated by the model", registry=r)
        self.device_util = Gauge("inferlog_device_utilization", "GPU utilisation, 0-1", registry=r)
        for status in ("OK", "EXPIRED"):
            self.results.labels(status)  # present at 0 before the first one
        for outcome in ("ok", "aborted"):
            self.commits.labels(outcome)

    def committed(self, outputs, now_ms: int, seconds: float) -> None:
        """Count what one successful commit made visible."""
        self.commits.labels("ok").inc()
        self.stage.labels("commit").observe(seconds)
        counts: dict = {}
        e2e: dict = {}  # each label's child looked up once per commit, not once per output
        for o in outputs:
            key = (o.dead, o.label)
            counts[key] = counts.get(key, 0) + 1
            if o.created_at is not None:
                h = e2e.get(o.tier)
                if h is None:
                    h = e2e[o.tier] = self.e2e.labels(o.tier)
                h.observe(max(0.0, (now_ms - o.created_at) / 1000.0))
        for (dead, label), n in counts.items():
            (self.dead_letters if dead else self.results).labels(label).inc(n)

    def sample_device(self, device) -> None:
        if getattr(device, "type", None) != "cuda":
            return
        import torch

        self.device_memory.set(torch.cuda.memory_allocated(device))
        try:
            self.device_util.set(torch.cuda.utilization(device) / 100.0)
        except Exception:  # needs pynvml; memory alone is still useful
            pass


class LagSampler:
    """`inferlog_consumer_lag{topic,partition}`: log end minus the group's committed offset (the
    log start where nothing is committed), asked of the cluster on a thread of its own. The
    group is the model's own (settings.worker_group); `model` is added on export, as to every
    worker series.

    On the loop thread it cost ~200 ms a sample here: a read_committed consumer's committed()
    waits for its own transaction's offsets to be stable, with a 100 ms retry backoff. A
    read_uncommitted reader of the group answers at once (require_stable off: a gauge may lag a
    transaction behind); not the admin API's group offsets, which kill the process when the
    coordinator moves (inferlog/committed.py). The log ends come from the admin API. Cached
    watermarks will not do: they come with fetch responses, and a partition paused by
    back-pressure (a backlog, when lag matters most) gets none."""

    def __init__(self, settings, gauge: Gauge, timeout: float = 5.0):
        from confluent_kafka.admin import AdminClient

        from inferlog.clients import confluent_config
        from inferlog.committed import group_reader

        self.new_admin = lambda: AdminClient(confluent_config(settings))
        self.admin, self.gauge, self.timeout = self.new_admin(), gauge, timeout
        self._retired = None  # the admin client replaced last, freed one replacement later
        self._renewed = time.monotonic()
        self.reader = group_reader(settings, settings.worker_group)  # used and closed on the thread
        self._want: list | None = None  # the partitions to sample next (the worker's current assignment)
        self._wake = threading.Condition()
        self._stop = False
        self.owned: set = set()  # read when a sample lands: a partition revoked meanwhile gets no series
        self.thread = threading.Thread(target=self._run, name="inferlog-lag", daemon=True)
        self.thread.start()

    def sample(self, partitions: list[tuple[str, int]]) -> None:
        """Ask for a sample of these partitions (replacing a request not yet taken up)."""
        with self._wake:
            self.owned = set(partitions)
            self._want = list(partitions)
            self._wake.notify()

    def forget(self, topic: str, partition: int) -> None:
        self.owned.discard((topic, partition))
        try:
            self.gauge.remove(topic, str(partition))
        except KeyError:
            pass

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self.reader.close()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while self._want is None and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                want, self._want = self._want, None
            try:
                lag = self._measure(want)
            except Exception as e:  # coordinator or leader away: no sample this time
                log.debug("lag sample: %s", e)
                self._renew()
                continue
            for (topic, partition), n in lag.items():
                if (topic, partition) in self.owned:
                    self.gauge.labels(topic, str(partition)).set(n)

    def _renew(self) -> None:
        """A new admin client after a failed sample, at most every 10 s: librdkafka's keeps
        asking a restarted broker with the leader epoch it knew before (FENCED_LEADER_EPOCH on
        every ListOffsets, for good), and the gauge stood still (tests/chaos/test_group_reads.py)."""
        if time.monotonic() - self._renewed < 10.0:
            return
        self._renewed = time.monotonic()
        self._retired, self.admin = self.admin, self.new_admin()

    def _measure(self, want: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        from confluent_kafka import IsolationLevel, TopicPartition
        from confluent_kafka.admin import OffsetSpec

        tps = [TopicPartition(t, p) for t, p in want]
        done = {(tp.topic, tp.partition): tp.offset for tp in self.reader.committed(tps, timeout=self.timeout)
                if tp.error is None}

        def offsets(keys, spec) -> dict:
            # read_committed, as the worker reads: the end is the last stable offset
            futs = self.admin.list_offsets({TopicPartition(t, p): spec for t, p in keys}, request_timeout=self.timeout,
                                           isolation_level=IsolationLevel.READ_COMMITTED)
            return {(tp.topic, tp.partition): f.result(self.timeout).offset for tp, f in futs.items()}

        ends = offsets(want, OffsetSpec.latest())
        unset = [k for k in want if done.get(k, -1) < 0]
        starts = offsets(unset, OffsetSpec.earliest()) if unset else {}
        return {k: max(0, end - (done[k] if done.get(k, -1) >= 0 else starts[k])) for k, end in ends.items()
                if k in done or k in starts}


class HealthServer:
    """/metrics, /healthz (the loop turned recently), /readyz (warm and assigned)."""

    def __init__(self, port: int, metrics: Metrics, alive, ready, host: str = "0.0.0.0"):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/metrics":
                    return self._send(200, generate_latest(metrics.exported), CONTENT_TYPE_LATEST)
                if path == "/healthz":
                    ok, why = alive()
                    return self._send(200 if ok else 503, json.dumps({"alive": ok, "detail": why}).encode())
                if path == "/readyz":
                    ok, why = ready()
                    return self._send(200 if ok else 503, json.dumps({"ready": ok, "detail": why}).encode())
                self._send(404, b'{"error": "not found"}')

            def _send(self, code, body, ctype="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # probes every few seconds would flood the log
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="inferlog-http", daemon=True)

    def start(self) -> "HealthServer":
        self.thread.start()
        log.info("metrics and health on :%d (/metrics /healthz /readyz)", self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


"""Prometheus metrics of one worker, and its HTTP endpoints (/metrics, /healthz, /readyz).

Each worker owns its registry (several workers in one process, as in tests, do not mix).
Names are documented in the README; labels stay low-cardinality (no request ids).
"""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

log = logging.getLogger(__name__)
# no `_created` series beside every counter and histogram: a timestamp per series nobody charts
disable_created_metrics()

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
E2E_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKENS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self) -> None:
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
        self.lag = Gauge("inferlog_consumer_lag", "High watermark minus position, per assigned partition",
                         ["partition"], registry=r)
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


class HealthServer:
    """/metrics, /healthz (the loop turned recently), /readyz (warm and assigned)."""

    def __init__(self, port: int, metrics: Metrics, alive, ready, host: str = "0.0.0.0"):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/metrics":
                    return self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
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


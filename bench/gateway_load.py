"""Load on the HTTP gateway path: concurrent clients each POST /v1/requests?wait=N (submit and
wait for the result) in a loop, for a bounded time and count.

    .venv/bin/python bench/gateway_load.py [--clients 16] [--duration 20] [--max-requests 5000]
                                          [--wait 10] [--url http://127.0.0.1:8080 --api-key KEY]

Without --url it starts everything on loopback: a throwaway LocalKafka (or --bootstrap-servers),
fresh topics, one `inferlog worker` (the default MiniLM) and one `inferlog gateway`, each its
own process, as deployed. The load generator (httpx, asyncio) runs here. Reports throughput,
client-side latency percentiles, status codes, and the gateway's event-loop lag (the max of
inferlog_gateway_event_loop_lag_max_seconds, read from its /metrics). Prints and saves JSON
to bench/results/gateway.json.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import ipaddress
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

from inferlog.consumer.demo import sample_texts
from inferlog.localkafka import LocalKafka
from inferlog.settings import load_settings
from inferlog.topics import ensure_topics
from harness import free_port, percentile  # noqa: E402  (bench/ is on sys.path as the script's dir)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "gateway.json"
INFERLOG = [sys.executable, "-m", "inferlog.cli"]




def loopback_only(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to load {url}: this benchmark only targets loopback addresses")


@contextlib.contextmanager
def local_stack(bootstrap: str | None, log_dir: Path):
    """Kafka (unless given), topics, a worker and a gateway as subprocesses; yields (url, api key)."""
    lk = None
    if bootstrap is None:
        port = free_port()
        base = load_settings(bootstrap_servers=f"127.0.0.1:{port}", kafka_home=ROOT / ".kafka")
        lk = LocalKafka.from_settings(base, port=port, controller_port=free_port(),
                                      data_dir=Path(tempfile.mkdtemp(prefix="inferlog-gw-bench-kafka-")))
        lk.fetch()
        print(f"starting a throwaway Kafka on {lk.bootstrap} ...", flush=True)
        lk.start()
        bootstrap = lk.bootstrap
    tag = f"bench.gw.{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex
    topics = {"requests_topic": f"{tag}.requests", "high_priority_topic": f"{tag}.requests.high",
              "results_topic": f"{tag}.results", "deadletter_topic": f"{tag}.deadletter"}
    ensure_topics(load_settings(bootstrap_servers=bootstrap, **topics))
    env = {**os.environ, **{f"INFERLOG_{k.upper()}": v for k, v in topics.items()},
           "INFERLOG_BOOTSTRAP_SERVERS": bootstrap, "INFERLOG_GROUP_ID": f"{tag}.workers",
           "INFERLOG_API_KEYS": f"{key}:bench", "INFERLOG_TENANT_RATE": "0",  # measure the path, not the quota
           "INFERLOG_TENANT_MAX_IN_FLIGHT": "100000"}
    port = free_port()
    procs = []
    try:
        for name, argv in (("worker", ["worker"]), ("gateway", ["gateway", "--host", "127.0.0.1", "--port", str(port)])):
            log = open(log_dir / f"{name}.log", "w")
            procs.append(subprocess.Popen([*INFERLOG, *argv], env=env, stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_until_answering(url, key)
        yield url, key
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        if lk is not None:
            lk.stop()


def wait_until_answering(url: str, key: str, timeout: float = 300) -> None:
    """Until a request goes through the whole path (the worker loads and warms its model first)."""
    deadline = time.monotonic() + timeout
    print("waiting for the gateway and the worker ...", flush=True)
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{url}/v1/requests", params={"wait": 10}, headers={"X-API-Key": key},
                           json={"task": "embed", "inputs": "warm-up"}, timeout=15)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(1)
    raise SystemExit(f"the stack did not answer within {timeout}s (see the worker and gateway logs)")


async def load(url: str, key: str, clients: int, duration: float, max_requests: int, wait: float) -> dict:
    texts = sample_texts(1000)
    latencies: list[float] = []
    codes: collections.Counter = collections.Counter()
    sent = 0
    stop_at = time.monotonic() + duration

    async def client(c: httpx.AsyncClient, i: int) -> None:
        nonlocal sent
        while time.monotonic() < stop_at and sent < max_requests:
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/requests", params={"wait": wait},
                                 json={"task": "embed", "inputs": texts[(sent + i) % len(texts)]})
                codes[str(r.status_code) + ("" if r.status_code != 200 else f" {r.json()['status']}")] += 1
                if r.status_code in (200, 202):  # 202: --wait 0 measures the submit path alone
                    latencies.append(time.perf_counter() - t0)
            except httpx.HTTPError as e:
                codes[type(e).__name__] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, limits=limits,
                                 timeout=wait + 30) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
        metrics = (await c.get("/metrics")).text
    return {"clients": clients, "sent": sent, "answered": len(latencies), "seconds": round(elapsed, 2),
            "per_s": round(len(latencies) / elapsed, 1), "codes": dict(codes),
            "latency_ms": {f"p{q}": round(percentile(latencies, q) * 1000, 1) for q in (50, 90, 95, 99)}
            | {"max": round(max(latencies, default=float("nan")) * 1000, 1)},
            "event_loop_lag_max_ms": round(metric(metrics, "inferlog_gateway_event_loop_lag_max_seconds") * 1000, 2),
            "event_loop_lag_samples": int(metric(metrics, "inferlog_gateway_event_loop_lag_seconds_count")),
            # a loaded machine delays any process now and then; blocking code shows as many
            "event_loop_lag_samples_over_25ms": int(
                metric(metrics, "inferlog_gateway_event_loop_lag_seconds_count")
                - metric(metrics, 'inferlog_gateway_event_loop_lag_seconds_bucket{le="0.025"}'))}


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (connections)")
    ap.add_argument("--duration", type=float, default=20, help="seconds of load at most")
    ap.add_argument("--max-requests", type=int, default=5000, help="requests at most")
    ap.add_argument("--wait", type=float, default=10,
                    help="?wait= of each request (seconds); 0: submit only (202), the gateway without the model")
    ap.add_argument("--url", help="a running gateway (loopback only); default: start one")
    ap.add_argument("--api-key", help="with --url: the key to send")
    ap.add_argument("--bootstrap-servers", help="without --url: use this cluster, not a throwaway broker")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.url:
        loopback_only(args.url)
        stack = contextlib.nullcontext((args.url, args.api_key or ""))
    else:
        logs = Path(tempfile.mkdtemp(prefix="inferlog-gw-bench-logs-"))
        print(f"worker and gateway logs in {logs}", flush=True)
        stack = local_stack(args.bootstrap_servers, logs)
    with stack as (url, key):
        print(f"{args.clients} clients, up to {args.duration:g}s / {args.max_requests} requests, wait={args.wait:g}s",
              flush=True)
        result = asyncio.run(load(url, key, args.clients, args.duration, args.max_requests, args.wait))
    report = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg": [round(x, 2) for x in os.getloadavg()]},
              "stack": "given URL" if args.url else "local: Kafka + 1 worker (MiniLM, cpu) + 1 gateway, each a process",
              **result}
    print(json.dumps(report, indent=2))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()

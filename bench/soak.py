"""Soak: does a worker under steady load keep lag and memory bounded?

    .venv/bin/python bench/soak.py [--duration 120] [--load 0.7] [--saturation-count 2000]
                                   [--rate R] [--bootstrap-servers HOST:PORT] [--model DIR]

1. Saturation: flood --saturation-count requests at an idle, warm worker and time until the
   last result is committed: that is the rate the worker can sustain.
2. Soak: offer --load x saturation requests/s, open loop (each request is sent at its
   scheduled time whatever the worker does), for --duration seconds; then let it drain.
Every second it samples consumer lag (end offsets minus the group's committed offsets),
the end-to-end latency of the results committed in that second (read with read_committed:
created_at -> visible to a reader), and the worker process's RSS (/proc/<pid>/status).
The worker is a real `inferlog worker` subprocess on the default model. Loopback only: a
LocalKafka of its own on free ports unless --bootstrap-servers is given. Prints a summary,
saves bench/results/soak.json and bench/results/soak.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from confluent_kafka import Consumer, TopicPartition

from inferlog.clients import confluent_config
from inferlog.codec import RESULT, Codec
from inferlog.consumer.demo import sample_texts
from inferlog.localkafka import LocalKafka
from inferlog.producer.sync import Producer
from inferlog.request import now_ms
from inferlog.settings import load_settings
from inferlog.topics import ensure_topics
from harness import free_port  # noqa: E402  (bench/ is on sys.path as the script's dir)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"



def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def slope(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (units of y per second)."""
    if len(ts) < 2:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else 0.0


class ResultReader(threading.Thread):
    """Reads the results topic (read_committed) as results become visible: per wall-clock
    second, the end-to-end latencies (created_at -> visible here) of what was committed."""

    def __init__(self, s):
        super().__init__(daemon=True)
        self.s, self.codec = s, Codec.from_settings(s)
        self.count = 0
        self.by_second: dict[int, list[float]] = defaultdict(list)
        self.stop_flag = threading.Event()

    def run(self) -> None:
        c = Consumer(confluent_config(self.s, **{"group.id": f"soak-reader-{uuid.uuid4().hex[:8]}",
                                                 "isolation.level": "read_committed", "enable.auto.commit": False,
                                                 "auto.offset.reset": "earliest"}))
        c.subscribe([self.s.model_results_topic])
        try:
            while not self.stop_flag.is_set():
                for m in c.consume(500, 0.1):
                    if m.error() is not None:
                        continue
                    seen = now_ms()
                    rec = self.codec.decode(m.value(), expect=RESULT)
                    self.by_second[int(seen // 1000)].append(seen - rec["timings"]["created_at"])
                    self.count += 1
        finally:
            c.close()


def lag(s, probe: Consumer) -> int:
    tps = [TopicPartition(s.tier_topic("normal"), p) for p in range(s.partitions)]
    committed = {tp.partition: tp.offset for tp in probe.committed(tps, timeout=10)}
    total = 0
    for tp in tps:
        _, high = probe.get_watermark_offsets(tp, timeout=10)
        done = committed.get(tp.partition, -1)
        total += high - max(done, 0)
    return total


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_worker(s, args, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, INFERLOG_BOOTSTRAP_SERVERS=s.bootstrap_servers, INFERLOG_REQUESTS_TOPIC=s.requests_topic,
               INFERLOG_HIGH_PRIORITY_TOPIC=s.high_priority_topic, INFERLOG_RESULTS_TOPIC=s.results_topic,
               INFERLOG_DEADLETTER_TOPIC=s.deadletter_topic, INFERLOG_GROUP_ID=s.group_id,
               INFERLOG_WORKER_ID="soak-w0", INFERLOG_DEVICE="cpu")
    if args.model:
        env["INFERLOG_MODEL"] = args.model
    cmd = [sys.executable, "-m", "inferlog.cli", "worker", "--no-create-topics",
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    p = subprocess.Popen(cmd, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while "assigned [" not in log_path.read_text(errors="replace"):
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return p


def wait_for(reader: ResultReader, n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while reader.count < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def saturation(s, reader: ResultReader, texts: list[str], n: int) -> dict:
    base = reader.count
    t0 = time.monotonic()
    with Producer(s) as p:
        for i in range(n):
            p.submit("embed", texts[i % len(texts)])
    if not wait_for(reader, base + n, timeout=max(120, n / 5)):
        raise SystemExit(f"saturation: only {reader.count - base} of {n} results")
    took = time.monotonic() - t0
    return {"requests": n, "seconds": round(took, 2), "rate": round(n / took, 1)}


def soak(s, reader: ResultReader, worker: subprocess.Popen, texts: list[str], rate: float, duration: float) -> dict:
    probe = Consumer(confluent_config(s, **{"group.id": s.worker_group, "enable.auto.commit": False}))
    sent = [0]
    stop = threading.Event()

    def produce():  # open loop: each request goes at its scheduled time
        with Producer(s) as p:
            t0 = time.monotonic()
            while not stop.is_set():
                due = t0 + sent[0] / rate
                if due > t0 + duration:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                p.submit("embed", texts[sent[0] % len(texts)])
                sent[0] += 1

    base = reader.count
    prod = threading.Thread(target=produce, daemon=True)
    t_start = time.monotonic()
    prod.start()
    samples = []
    try:
        while prod.is_alive() or time.monotonic() - t_start < duration:
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t_start) % 1.0))
            t = time.monotonic() - t_start
            sec = int(now_ms() // 1000) - 1  # the second that just ended
            lat = reader.by_second.get(sec, [])
            samples.append({"t": round(t, 1), "lag": lag(s, probe), "rss_mb": rss_mb(worker.pid),
                            "results": len(lat), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                            "sent": sent[0]})
            print(f"  t={t:6.1f}s sent={sent[0]:6d} lag={samples[-1]['lag']:5d} "
                  f"p50={samples[-1]['p50_ms'] or 0:7.0f}ms p99={samples[-1]['p99_ms'] or 0:7.0f}ms "
                  f"rss={samples[-1]['rss_mb'] or 0:6.0f}MB", flush=True)
    finally:
        stop.set()
        prod.join(30)
    drained = wait_for(reader, base + sent[0], timeout=120)
    probe.close()
    return {"offered_rate": round(rate, 1), "sent": sent[0], "answered": reader.count - base, "drained": drained,
            "samples": samples}


def verdict(run: dict, duration: float) -> dict:
    ss = run["samples"]
    half = [x for x in ss if x["t"] >= duration / 2]
    first10 = [x for x in ss if x["t"] <= 10]
    lat = [v for x in ss if x["t"] > 10 for v in (x["p50_ms"],) if v is not None]
    p99 = [x["p99_ms"] for x in ss if x["t"] > 10 and x["p99_ms"] is not None]
    lag_first10 = max((x["lag"] for x in first10), default=0)
    lag_half = max((x["lag"] for x in half), default=0)
    lag_slope = slope([x["t"] for x in half], [x["lag"] for x in half])
    rss = [(x["t"], x["rss_mb"]) for x in half if x["rss_mb"] is not None]
    rss_slope = slope([t for t, _ in rss], [r for _, r in rss]) * 60  # MB per minute
    rate = run["offered_rate"]
    return {
        "lag_max_first_10s": lag_first10, "lag_max_second_half": lag_half,
        "lag_slope_second_half_per_s": round(lag_slope, 2),
        # bounded: the backlog at the end is no worse than at the start (plus one second of arrivals),
        # and it is not growing by more than 5% of the offered rate
        "lag_bounded": lag_half <= 2 * lag_first10 + rate and lag_slope < 0.05 * rate,
        "rss_mb_start": ss[0]["rss_mb"], "rss_mb_end": ss[-1]["rss_mb"],
        "rss_slope_second_half_mb_per_min": round(rss_slope, 2),
        "memory_bounded": abs(rss_slope) < 5.0,  # a leak of a few KB per request shows far above this
        "latency_p50_ms_median": pct(lat, 0.5), "latency_p99_ms_max": max(p99, default=None),
    }


def plot(run: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ss = run["samples"]
    t = [x["t"] for x in ss]
    fig, ax = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax[0].plot(t, [x["lag"] for x in ss])
    ax[0].set_ylabel("consumer lag (records)")
    ax[1].plot(t, [x["p50_ms"] for x in ss], label="p50")
    ax[1].plot(t, [x["p99_ms"] for x in ss], label="p99")
    ax[1].set_ylabel("end-to-end latency (ms)")
    ax[1].legend()
    ax[2].plot(t, [x["rss_mb"] for x in ss])
    ax[2].set_ylabel("worker RSS (MB)")
    ax[2].set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of steady load")
    ap.add_argument("--load", type=float, default=0.7, help="offered rate as a fraction of saturation")
    ap.add_argument("--rate", type=float, help="offered rate (requests/s); skips the saturation run")
    ap.add_argument("--saturation-count", type=int, default=2000)
    ap.add_argument("--bootstrap-servers", help="an existing broker (default: a LocalKafka of its own)")
    ap.add_argument("--model", help="model directory (default: the embedded all-MiniLM-L6-v2)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = ap.parse_args()
    if not 0 < args.duration <= 3600:
        raise SystemExit("--duration must be in (0, 3600] seconds")

    tmp = Path(tempfile.mkdtemp(prefix="inferlog-soak-"))
    broker = None
    if args.bootstrap_servers:
        bootstrap = args.bootstrap_servers
    else:
        base = load_settings()
        broker = LocalKafka(ROOT / ".kafka" / "libs" / base.kafka_version, tmp / "kafka", free_port(), free_port(),
                            base.kafka_version)
        broker.fetch()
        bootstrap = broker.start(timeout=180)
    worker = None
    try:
        tag = f"soak.{uuid.uuid4().hex[:8]}"
        s = load_settings(bootstrap_servers=bootstrap, requests_topic=f"{tag}.requests",
                          high_priority_topic=f"{tag}.requests.high", results_topic=f"{tag}.results",
                          deadletter_topic=f"{tag}.deadletter", group_id=f"{tag}.workers", partitions=6)
        ensure_topics(s)
        texts = sample_texts(500)
        reader = ResultReader(s)
        reader.start()
        worker = start_worker(s, args, tmp / "worker.log")
        print(f"worker pid {worker.pid} ready; log {tmp / 'worker.log'}")
        sat = None
        if args.rate is None:
            sat = saturation(s, reader, texts, args.saturation_count)
            print(f"saturation: {sat['requests']} requests in {sat['seconds']} s = {sat['rate']} req/s")
        rate = args.rate or args.load * sat["rate"]
        print(f"soak: {rate:.1f} req/s open loop for {args.duration:.0f} s")
        run = soak(s, reader, worker, texts, rate, args.duration)
        v = verdict(run, args.duration)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if broker is not None:
            broker.stop()
    out = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "saturation": sat, "duration_s": args.duration, "load": args.load, **{k: run[k] for k in run if k != "samples"},
        "verdict": v, "worker_exit": worker.returncode if worker else None, "samples": run["samples"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    png = args.out.with_suffix(".png")
    plot(run, png, f"inferlog soak: {run['offered_rate']} req/s offered"
                   + (f" ({args.load:.0%} of {sat['rate']} saturation)" if sat else ""))
    shutil.rmtree(tmp, ignore_errors=True)
    print("\nsummary")
    if sat:
        print(f"  saturation   {sat['rate']} req/s ({sat['requests']} requests in {sat['seconds']} s)")
    print(f"  offered      {run['offered_rate']} req/s for {args.duration:.0f} s: {run['sent']} sent, "
          f"{run['answered']} answered, drained={run['drained']}")
    print(f"  latency      p50 {v['latency_p50_ms_median']} ms (median over seconds after 10 s), "
          f"worst per-second p99 {v['latency_p99_ms_max']} ms")
    print(f"  lag          max {v['lag_max_first_10s']} in the first 10 s, {v['lag_max_second_half']} in the second half, "
          f"slope {v['lag_slope_second_half_per_s']}/s -> {'bounded' if v['lag_bounded'] else 'NOT bounded'}")
    print(f"  memory (RSS) {v['rss_mb_start']:.0f} MB -> {v['rss_mb_end']:.0f} MB, second-half slope "
          f"{v['rss_slope_second_half_mb_per_min']} MB/min -> {'bounded' if v['memory_bounded'] else 'NOT bounded'}")
    print(f"  saved        {args.out} and {png}")


if __name__ == "__main__":
    main()

"""Replay throughput against the live worker's, on the same records and settings.

    .venv/bin/python bench/replay_bench.py [--count 2000] [--max-batch-size 32] [--max-wait-ms 20]
                                           [--rounds 1] [--bootstrap-servers HOST:PORT]

N requests are produced once; then, with the same model (the default all-MiniLM-L6-v2,
loaded and warmed once) and the same batching settings:
  live          a Worker drains them: from partition assignment to the last committed result
  replay topic  `replay` of the whole topic to a new topic, exactly-once transactions
  replay file   `replay` of the whole topic to a Parquet file (parts + checkpoints, then merged)
Replay figures are the run's loop time (the window is resolved and the model warm before
it starts); `wall` adds resolving, topic creation and, for files, the final merge.
Prints a markdown table and saves JSON to bench/results/replay.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default model ships with its weights

import torch

from inferlog.consumer.demo import sample_texts
from inferlog.consumer.runners import load_runner
from inferlog.localkafka import LocalKafka
from inferlog.producer.sync import Producer
from inferlog.replay import runner as rr
from inferlog.replay.window import resolve_window
from inferlog.settings import default_model_path, load_settings
from inferlog.topics import ensure_topics
from harness import free_port, serving  # noqa: E402  (bench/ is on sys.path as the script's dir)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "replay.json"
PARTITIONS = 6



def live(s, runner, n: int) -> dict:
    """The worker over the N requests, with a fresh group each round."""
    s = s.with_overrides(group_id=f"{s.requests_topic}.live.{uuid.uuid4().hex[:6]}",
                         results_topic=f"{s.requests_topic}.live.{uuid.uuid4().hex[:6]}")
    ensure_topics(s, [s.results_topic], partitions=PARTITIONS)
    committed, done, t_end = [0], threading.Event(), [0.0]

    def on_commit(outputs):
        committed[0] += len(outputs)
        if committed[0] >= n and not done.is_set():
            t_end[0] = time.perf_counter()
            done.set()

    with serving(s, runner, on_commit=on_commit) as w:
        t0, c0 = time.perf_counter(), time.process_time()
        if not done.wait(max(120.0, n / 5)):
            raise RuntimeError(f"only {committed[0]} of {n} committed in time")
        wall, cpu = t_end[0] - t0, time.process_time() - c0
    return {"seconds": wall, "per_s": n / wall, "cpu_ms_per_record": cpu * 1000 / n, "commits": w.counts["commits"]}


def replay(s, runner, kind: str, state: Path) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    window = resolve_window(s, s.requests_topic)
    out = rr.output_spec(str(state / f"{uuid.uuid4().hex[:6]}.parquet"), None, None) if kind == "file" else \
        rr.output_spec(None, f"{s.requests_topic}.replay.{uuid.uuid4().hex[:6]}", None)
    summary = rr.start(s, window, out, runner=runner, state_dir=state)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if summary.status != "done" or summary.results != window.total:
        raise RuntimeError(f"replay {kind}: {summary}")
    return {"seconds": summary.seconds, "per_s": summary.rate, "wall_seconds": wall, "wall_per_s": window.total / wall,
            "cpu_ms_per_record": cpu * 1000 / window.total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=1, help="repeat, interleaved; keep each contender's best")
    ap.add_argument("--bootstrap-servers", help="use this cluster (default: a throwaway local broker)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    lk, state = None, Path(tempfile.mkdtemp(prefix="inferlog-replay-bench-"))
    if args.bootstrap_servers is None:
        port = free_port()
        base = load_settings(bootstrap_servers=f"127.0.0.1:{port}", kafka_home=ROOT / ".kafka")
        lk = LocalKafka.from_settings(base, port=port, controller_port=free_port(), data_dir=state / "kafka")
        lk.fetch()
        print(f"starting a throwaway Kafka {lk.version} on {lk.bootstrap} ...", flush=True)
        lk.start()
    else:
        base = load_settings(bootstrap_servers=args.bootstrap_servers)
    try:
        tag = f"bench.replay.{uuid.uuid4().hex[:8]}"
        s = base.with_overrides(model=default_model_path(), requests_topic=f"{tag}.requests",
                                results_topic=f"{tag}.results", deadletter_topic=f"{tag}.deadletter",
                                max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms)
        ensure_topics(s, partitions=PARTITIONS)
        runner = load_runner(s.model, device=s.device, dtype=s.dtype)
        runner.warmup()
        with Producer(s) as p:
            for t in sample_texts(args.count):
                p.submit("embed", t)
        runs: dict[str, list[dict]] = {"live": [], "replay topic": [], "replay file": []}
        for rnd in range(1, args.rounds + 1):
            for name in runs:
                print(f"[{rnd}] {name} ...", flush=True)
                runs[name].append(live(s, runner, args.count) if name == "live"
                                  else replay(s, runner, name.split()[1], state))
        best = {k: {**max(v, key=lambda r: r["per_s"]), "per_s_rounds": [round(r["per_s"], 1) for r in v]}
                for k, v in runs.items()}
    finally:
        if lk is not None:
            lk.stop()
        shutil.rmtree(state, ignore_errors=True)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python", *sys.argv]), "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "model": runner.info.name, "device": str(runner.device), "count": args.count, "partitions": PARTITIONS,
              "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "rounds": args.rounds,
              "kafka": args.bootstrap_servers or f"local {lk.version}", "results": best}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    live_rate = best["live"]["per_s"]
    print(f"\n{args.count} records, {report['model']} on {report['device']}, batch {args.max_batch_size} / "
          f"wait {args.max_wait_ms:g} ms, {os.cpu_count()} CPUs\n")
    print("| contender | records/s | / live | wall records/s | CPU ms/record |\n|---|---:|---:|---:|---:|")
    for name, r in best.items():
        print(f"| {name} | {r['per_s']:.1f} | {r['per_s'] / live_rate:.2f} | "
              f"{r.get('wall_per_s', r['per_s']):.1f} | {r['cpu_ms_per_record']:.1f} |")
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end throughput: the inferlog pipeline against the model alone and a naive consumer.

    .venv/bin/python bench/pipeline_bench.py [--count 2000] [--max-batch-size 32] [--max-wait-ms 20]
                                             [--bootstrap-servers HOST:PORT] [--sweep]

Three contenders on the same sample texts and the same default model (all-MiniLM-L6-v2):
  offline   the runner called directly in batches (tokenize -> prepare -> run -> finish), no Kafka
  pipeline  N requests produced first, then a Worker drains them: from partition assignment
            until the last result is committed (exactly-once transactions)
  naive     one request at a time: poll, decode, model, produce + flush, synchronous commit
Model load and warm-up are outside every timing. Each contender gets its own topics and
consumer group, so nothing is shared between runs. Prints a markdown table and saves JSON
to bench/results/pipeline.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default model ships with its weights

import torch
from confluent_kafka import Consumer, Producer as KafkaProducer, TopicPartition

from inferlog.clients import confluent_config
from inferlog.codec import REQUEST, RESULT, Codec
from inferlog.consumer.demo import sample_texts
from inferlog.consumer.runners import Row, load_runner
from inferlog.consumer.stages import BatchInfo, Pending, ResultBuilder
from inferlog.consumer.worker import Worker
from inferlog.localkafka import LocalKafka
from inferlog.producer.sync import Producer
from inferlog.request import Limits, Parameters, now_ms, validate_request
from inferlog.settings import default_model_path, load_settings
from inferlog.topics import ensure_topics

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "pipeline.json"
PARTITIONS = 6
SWEEP = [(8, 5), (32, 20), (64, 50)]
# The worker calls the model from its own device thread. torch's libgomp counts the OpenMP
# teams of all threads: with more busy threads than cores it stops spin-waiting, without it
# spins, which on a shared, loaded machine costs about 3x CPU per request. So offline and
# naive call the model from a thread of their own too, not from the main thread.
MODEL_THREAD = ThreadPoolExecutor(1, thread_name_prefix="bench-model")


def on_model_thread(fn, *args):
    return MODEL_THREAD.submit(fn, *args).result()


# -- helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_settings(base, name: str, **overrides):
    """Own topics and group per contender: no run reads another's offsets or results."""
    tag = f"bench.{name}.{uuid.uuid4().hex[:8]}"
    s = base.with_overrides(requests_topic=f"{tag}.requests", results_topic=f"{tag}.results",
                            deadletter_topic=f"{tag}.deadletter", group_id=f"{tag}.group", **overrides)
    ensure_topics(s, partitions=PARTITIONS)
    return s


def produce_requests(settings, texts: list[str]) -> None:
    with Producer(settings) as prod:
        for t in texts:
            prod.submit("embed", t, metadata={"source": "bench"})


def read_results(settings, codec: Codec, timeout: float = 60) -> list[dict]:
    """Every committed result (read_committed), to check the count the timing relied on."""
    topic = settings.results_topic
    c = Consumer(confluent_config(settings, **{"group.id": f"{topic}.reader", "isolation.level": "read_committed",
                                               "enable.auto.commit": False}))
    try:
        ends = {}
        for p in c.list_topics(topic, timeout=10).topics[topic].partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        out, deadline = [], time.monotonic() + timeout
        # the end offset may be a transaction marker, never delivered: stop on positions
        while any(c.position([TopicPartition(topic, p)])[0].offset < e for p, e in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took over {timeout}s")
            out += [codec.decode(m.value(), expect=RESULT) for m in c.consume(1000, 0.2) if m.error() is None]
        return out
    finally:
        c.close()


def rates(n: int, wall: float, cpu: float) -> dict:
    # The machine may be shared: CPU seconds per request (this process, all threads; the
    # broker not included) is steadier than the wall clock when others load the cores.
    return {"seconds": wall, "per_s": n / wall, "cpu_ms_per_request": cpu * 1000 / n, "loadavg_1m": os.getloadavg()[0]}


# -- contenders ------------------------------------------------------------------------------
def bench_offline(runner, texts: list[str], batch_size: int, by_length: bool = False) -> dict:
    """The ceiling: the same CPU + model work the worker does, with no Kafka and no waiting.
    by_length cuts batches from the length-sorted texts, as the batching policy may within its
    window: less padding, so this is the ceiling for a worker that sees the whole backlog."""
    params = Parameters()
    model_s, c0, t0 = 0.0, time.process_time(), time.perf_counter()
    if by_length:
        ids = sorted(runner.tokenize(texts), key=len)
        batches = (ids[i:i + batch_size] for i in range(0, len(ids), batch_size))
    else:
        batches = (runner.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size))
    for batch in batches:
        prepared = runner.prepare([Row(x, params) for x in batch])
        m0 = time.perf_counter()
        raw = runner.run(prepared)
        model_s += time.perf_counter() - m0
        runner.finish(raw, prepared)
    return {"batch_size": batch_size, "by_length": by_length, "model_seconds": model_s,
            **rates(len(texts), time.perf_counter() - t0, time.process_time() - c0)}


def bench_pipeline(base, runner, codec, texts: list[str], batch_size: int, wait_ms: float) -> dict:
    s = fresh_settings(base, "pipeline", max_batch_size=batch_size, max_wait_ms=wait_ms)
    produce_requests(s, texts)  # all requests wait in the log before the worker starts
    n, committed, done = len(texts), [0], threading.Event()
    t_end = [0.0]

    def on_commit(outputs):  # worker thread, after each successful transaction
        committed[0] += len(outputs)
        if committed[0] >= n and not done.is_set():
            t_end[0] = time.perf_counter()
            done.set()

    w = Worker(s, runner, codec=codec, on_commit=on_commit)
    th = threading.Thread(target=w.run, name="bench-worker", daemon=True)
    th.start()  # run() warms the (already warm) model, then joins the group
    if not w.ready.wait(120):
        raise RuntimeError("the worker got no partitions within 120 s")
    t0, c0 = time.perf_counter(), time.process_time()
    if not done.wait(max(120.0, n / 5)):
        raise RuntimeError(f"only {committed[0]} of {n} outputs committed in time")
    elapsed, cpu = t_end[0] - t0, time.process_time() - c0  # cpu: up to the check, a few ms late
    w.stop()
    th.join(60)
    results = read_results(s, codec)
    if len(results) != n or w.counts["dead_letters"]:
        raise RuntimeError(f"{len(results)} committed results and {w.counts['dead_letters']} dead letters for {n} requests")
    batches = {r["batch"]["batch_id"]: r for r in results}
    device_s = sum(r["timings"]["infer_ms"] for r in batches.values()) / 1000.0
    return {"max_batch_size": batch_size, "max_wait_ms": wait_ms, **rates(n, elapsed, cpu),
            "batches": len(batches), "mean_batch_size": n / len(batches),
            # time the device thread spent inside runner.run, over the wall time: below 1 it idled
            "device_busy": device_s / elapsed, "commits": w.counts["commits"]}


def bench_naive(base, runner, codec, texts: list[str]) -> dict:
    """What one writes first: one record in, one model call, one result out, commit, repeat."""
    s = fresh_settings(base, "naive")
    produce_requests(s, texts)
    builder, limits = ResultBuilder(codec, s, runner.info), Limits.from_settings(s)
    prod = KafkaProducer(confluent_config(s, **{"enable.idempotence": True, "acks": "all", "linger.ms": 0}))
    t0 = [0.0, 0.0]

    def on_assign(consumer, parts):
        if not t0[0]:  # same start line as the pipeline: assignment
            t0[0], t0[1] = time.perf_counter(), time.process_time()

    c = Consumer(confluent_config(s, **{"group.id": s.group_id, "enable.auto.commit": False,
                                        "auto.offset.reset": "earliest", "isolation.level": "read_committed"}))
    c.subscribe([s.requests_topic], on_assign=on_assign)
    n, done, deadline = len(texts), 0, time.monotonic() + max(300.0, len(texts) / 2)
    try:
        while done < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"naive consumer: only {done} of {n} done in time")
            m = c.poll(1.0)
            if m is None or m.error() is not None:
                continue
            p = Pending(m.topic(), m.partition(), m.offset(), 0, m.key(), m.value(), m.headers(), now_ms())
            p.request = validate_request(codec.decode(m.value(), expect=REQUEST), limits)
            rows = [Row(ids, p.request.parameters) for ids in runner.tokenize(p.request.inputs)]
            prepared = runner.prepare(rows)
            m0 = time.perf_counter()
            raw = runner.run(prepared)
            infer_ms = (time.perf_counter() - m0) * 1000
            out = builder.result(p, "OK", runner.finish(raw, prepared), BatchInfo.new(1, len(rows[0].ids)), infer_ms)
            prod.produce(out.topic, out.value, out.key)
            if prod.flush(30):  # at-least-once: the result is stored before the offset moves
                raise RuntimeError("naive consumer: result not delivered")
            c.commit(message=m, asynchronous=False)
            done += 1
        elapsed, cpu = time.perf_counter() - t0[0], time.process_time() - t0[1]
    finally:
        c.close()
        prod.flush(30)
    return rates(n, elapsed, cpu)


# -- main ------------------------------------------------------------------------------------
def machine_facts(argv: list[str]) -> dict:
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv]),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "platform": platform.platform()}


def table(report: dict) -> str:
    off = {(o["batch_size"], o["by_length"]): o["per_s"] for o in report["offline"]}
    naive = report["naive"]["per_s"]
    lines = ["| contender | batch / wait ms | requests/s | CPU ms/req | / offline | / offline sorted | / naive "
             "| mean batch | model busy | load 1m |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name, setting, r, bs, mean_batch, busy):
        lines.append(f"| {name} | {setting} | {r['per_s']:.1f} | {r['cpu_ms_per_request']:.1f} | "
                     f"{r['per_s'] / off[bs, False]:.2f} | {r['per_s'] / off[bs, True]:.2f} | {r['per_s'] / naive:.1f} | "
                     f"{mean_batch} | {busy} | {r['loadavg_1m']:.1f} |")

    for o in report["offline"]:
        row("offline, " + ("length-sorted" if o["by_length"] else "arrival order"), f"{o['batch_size']} / -", o,
            o["batch_size"], o["batch_size"], f"{o['model_seconds'] / o['seconds']:.0%}")
    for p in report["pipeline"]:
        row("inferlog pipeline", f"{p['max_batch_size']} / {p['max_wait_ms']:g}", p, p["max_batch_size"],
            f"{p['mean_batch_size']:.1f}", f"{p['device_busy']:.0%}")
    bs = min(b for b, _ in off)
    row("naive, 1 at a time", "1 / -", report["naive"], bs, 1, "-")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000, help="requests (texts) per contender")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--bootstrap-servers", help="use this cluster (default: a throwaway local broker)")
    ap.add_argument("--sweep", action="store_true", help=f"pipeline at (batch, wait ms) = {SWEEP}")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all contenders, interleaved; keep the best")
    ap.add_argument("--out", type=Path, help=f"JSON to write (default: {OUT.name}, or pipeline_sweep.json with --sweep)")
    args = ap.parse_args(argv)
    args.out = args.out or OUT.with_name("pipeline_sweep.json" if args.sweep else OUT.name)
    settings_list = SWEEP if args.sweep else [(args.max_batch_size, args.max_wait_ms)]

    lk = None
    if args.bootstrap_servers is None:
        port = free_port()
        tmp = tempfile.mkdtemp(prefix="inferlog-bench-kafka-")
        base = load_settings(bootstrap_servers=f"127.0.0.1:{port}", kafka_home=ROOT / ".kafka")
        lk = LocalKafka.from_settings(base, port=port, controller_port=free_port(), data_dir=Path(tmp))
        lk.fetch()
        print(f"starting a throwaway Kafka {lk.version} on {lk.bootstrap} (data in {tmp}) ...", flush=True)
        lk.start()
    else:
        base = load_settings(bootstrap_servers=args.bootstrap_servers)
    try:
        base = base.with_overrides(model=default_model_path())
        runner = load_runner(base.model, task=base.task, device=base.device, dtype=base.dtype)
        runner.warmup()
        codec = Codec.from_settings(base)
        texts = sample_texts(args.count)
        sizes = sorted({b for b, _ in settings_list})
        for bs in sizes:
            on_model_thread(bench_offline, runner, texts[:2 * bs], bs)  # warm the allocator and kernels at real shapes
        report = {"machine": machine_facts(sys.argv), "model": runner.info.name, "device": str(runner.device),
                  "count": args.count, "rounds": args.rounds, "partitions": PARTITIONS, "delivery": base.delivery,
                  "cpu_workers": base.cpu_workers, "kafka": args.bootstrap_servers or f"local {lk.version}"}
        # Rounds interleave the contenders, so load from other work on the machine falls on
        # all of them alike; each figure is the best round (the least disturbed one).
        runs: dict[str, list] = {}
        for rnd in range(1, args.rounds + 1):
            for bs in sizes:
                for by_length in (False, True):
                    print(f"[{rnd}] offline, batch {bs}{', length-sorted' if by_length else ''} ...", flush=True)
                    runs.setdefault(f"offline {bs} {by_length}", []).append(
                        on_model_thread(bench_offline, runner, texts, bs, by_length))
            for bs, wait in settings_list:
                print(f"[{rnd}] pipeline, batch {bs}, wait {wait:g} ms ...", flush=True)
                runs.setdefault(f"pipeline {bs} {wait}", []).append(bench_pipeline(base, runner, codec, texts, bs, wait))
            print(f"[{rnd}] naive consumer ...", flush=True)
            runs.setdefault("naive", []).append(on_model_thread(bench_naive, base, runner, codec, texts))
        best = {k: {**max(v, key=lambda r: r["per_s"]), "per_s_rounds": [round(r["per_s"], 1) for r in v]}
                for k, v in runs.items()}
        report["offline"] = [v for k, v in best.items() if k.startswith("offline")]
        report["pipeline"] = [v for k, v in best.items() if k.startswith("pipeline")]
        report["naive"] = best["naive"]
    finally:
        if lk is not None:
            lk.stop()
            shutil.rmtree(lk.data_dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    print(f"\n{args.count} requests, {report['model']} on {report['device']}, {m['cpu_count']} CPUs, "
          f"torch {m['torch']} ({m['torch_threads']} threads), Kafka {report['kafka']}\n")
    print(table(report))
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

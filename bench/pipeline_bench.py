"""End-to-end throughput: the inferlog pipeline against the model alone and a naive consumer.

    .venv/bin/python bench/pipeline_bench.py [--count 2000] [--max-batch-size 32] [--max-wait-ms 20]
                                             [--bootstrap-servers HOST:PORT] [--sweep] [--rounds R]
                                             [--device cuda --dtype float16] [--no-naive] [--replay]

Three contenders on the same sample texts and the same default model (all-MiniLM-L6-v2):
  offline   the runner called directly in batches (tokenize -> prepare -> run -> finish), no Kafka
  pipeline  N requests produced first, then a Worker drains them: from partition assignment
            until the last result is committed (exactly-once transactions)
  naive     one request at a time: poll, decode, model, produce + flush, synchronous commit
and with --replay two more, at --max-batch-size / --max-wait-ms: `replay` of the whole requests
topic (the same backlog) to a new topic (exactly-once transactions) and to a Parquet file
(parts + checkpoints, merged at the end), timed over the run's loop (window resolved, model
warm); `wall_per_s` in the JSON adds resolving, topic creation and the file's final merge.
Model load and warm-up are outside every timing. Each contender gets its own topics and
consumer group, so nothing is shared between runs. Prints a markdown table and saves JSON
to bench/results/pipeline.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import pipeline_table
from harness import (PARTITIONS, RESULTS, best_of, broker, fresh_settings, machine_facts, on_model_thread,
                     plot_bars, produce_requests, rates, read_results, save, serving)

from confluent_kafka import Consumer, Producer as KafkaProducer

from inferlog.clients import confluent_config
from inferlog.codec import REQUEST, Codec
from inferlog.consumer.demo import sample_texts
from inferlog.consumer.runners import Row, load_runner
from inferlog.consumer.records import BatchInfo, Pending
from inferlog.consumer.results import ResultBuilder
from inferlog.request import Limits, Parameters, now_ms, validate_request
from inferlog.settings import default_model_path

OUT = RESULTS / "pipeline.json"
SWEEP = [(8, 5), (32, 20), (64, 50)]


# -- contenders ------------------------------------------------------------------------------
def bench_offline(runner, texts: list[str], batch_size: int, by_length: bool = False) -> dict:
    """The ceiling: the same CPU + model work the worker does, with no Kafka and no waiting.
    by_length cuts batches from the length-sorted texts, as the batching policy may within its
    window: less padding, so this is the ceiling for a worker that sees the whole backlog."""
    params = Parameters()
    model_s, padded, c0, t0 = 0.0, 0, time.process_time(), time.perf_counter()
    if by_length:
        ids = sorted(runner.tokenize(texts), key=len)
        batches = (ids[i:i + batch_size] for i in range(0, len(ids), batch_size))
    else:
        batches = (runner.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size))
    for batch in batches:
        padded += runner.cost([len(x) for x in batch], [params] * len(batch))
        prepared = runner.prepare([Row(x, params) for x in batch])
        m0 = time.perf_counter()
        raw = runner.run(prepared)
        model_s += time.perf_counter() - m0
        runner.finish(raw, prepared)
    return {"batch_size": batch_size, "by_length": by_length, "model_seconds": model_s, "padded_tokens": padded,
            **rates(len(texts), time.perf_counter() - t0, time.process_time() - c0)}


def bench_pipeline(base, runner, codec, texts: list[str], batch_size: int, wait_ms: float,
                   partitions: int = PARTITIONS, **overrides) -> dict:
    s = fresh_settings(base, "pipeline", partitions, max_batch_size=batch_size, max_wait_ms=wait_ms, **overrides)
    produce_requests(s, texts)  # all requests wait in the log before the worker starts
    n, committed, done = len(texts), [0], threading.Event()
    t_end = [0.0]
    first = []  # (time, outputs) of the first commit: the steady rate leaves start-up out

    def on_commit(outputs):  # worker thread, after each successful transaction
        committed[0] += len(outputs)
        if not first:
            first.append((time.perf_counter(), committed[0]))
        if committed[0] >= n and not done.is_set():
            t_end[0] = time.perf_counter()
            done.set()

    with serving(s, runner, codec=codec, on_commit=on_commit) as w:  # run() warms the (already warm) model
        t0, c0 = time.perf_counter(), time.process_time()
        if not done.wait(max(120.0, n / 5)):
            raise RuntimeError(f"only {committed[0]} of {n} outputs committed in time")
        elapsed, cpu = t_end[0] - t0, time.process_time() - c0  # cpu: up to the check, a few ms late
    results = read_results(s, codec)
    if len(results) != n or w.counts["dead_letters"]:
        raise RuntimeError(f"{len(results)} committed results and {w.counts['dead_letters']} dead letters for {n} requests")
    batches = {r["batch"]["batch_id"]: r for r in results}
    device_s = sum(r["timings"]["infer_ms"] for r in batches.values()) / 1000.0
    return {"max_batch_size": batch_size, "max_wait_ms": wait_ms, **rates(n, elapsed, cpu),
            "batches": len(batches), "mean_batch_size": n / len(batches),
            # after the first commit: no group join, first fetch or first transaction in it
            "steady_per_s": (n - first[0][1]) / (t_end[0] - first[0][0]) if t_end[0] > first[0][0] else float("nan"),
            # time the device thread spent inside runner.run, over the wall time: below 1 it idled
            "device_busy": device_s / elapsed, "commits": w.counts["commits"],
            # the batches' padded size (each result carries its batch's): padding the policy left
            "padded_tokens": sum(r["batch"]["tokens"] for r in batches.values())}


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
    c.subscribe([s.tier_topic("normal")], on_assign=on_assign)
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


def bench_replay(base, runner, texts: list[str], batch_size: int, wait_ms: float, kind: str) -> dict:
    """`replay` of the whole requests topic to a new topic or a Parquet file: the worker's
    engine over a bounded window instead of a group's partitions."""
    from inferlog.replay import runner as rr
    from inferlog.replay.window import resolve_window

    s = fresh_settings(base, f"replay-{kind}", max_batch_size=batch_size, max_wait_ms=wait_ms)
    produce_requests(s, texts)
    with tempfile.TemporaryDirectory(prefix="inferlog-replay-bench-") as tmp:  # checkpoints, parts, the file
        state = Path(tmp)
        t0, c0 = time.perf_counter(), time.process_time()
        window = resolve_window(s, s.tier_topic("normal"))
        out = (rr.output_spec(str(state / "out.parquet"), None, None) if kind == "file"
               else rr.output_spec(None, f"{s.requests_topic}-replay", None))
        summary = rr.start(s, window, out, runner=runner, state_dir=state)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if summary.status != "done" or summary.results != len(texts):
        raise RuntimeError(f"replay to a {kind}: {summary.line()}")
    return {"output": kind, "max_batch_size": batch_size, "max_wait_ms": wait_ms,
            **rates(len(texts), summary.seconds, cpu), "wall_seconds": wall, "wall_per_s": len(texts) / wall}


# -- main ------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    """Throughput of every contender, offline figures next to the pipeline at the same batch size."""
    labels, values = [], []
    for o in report["offline"]:
        labels.append(f"offline b{o['batch_size']}" + (" sorted" if o["by_length"] else ""))
        values.append(o["per_s"])
    for p in report["pipeline"]:
        labels.append(f"inferlog b{p['max_batch_size']}/{p['max_wait_ms']:g}ms")
        values.append(p["per_s"])
    for r in report.get("replay", []):
        labels.append(f"replay to {r['output']} b{r['max_batch_size']}/{r['max_wait_ms']:g}ms")
        values.append(r["per_s"])
    if report.get("naive"):
        labels.append("naive 1-at-a-time")
        values.append(report["naive"]["per_s"])
    m = report["machine"]
    plot_bars(path, f"{report['model']} on {report['device']}: throughput ({report['count']} requests)", labels, values,
              "requests / second (higher is better)",
              f"{m['date']}, {m['cpu_count']} CPUs, load 1m at start {m['loadavg_start'][0]:.1f}; best of {report['rounds']} round(s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000, help="requests (texts) per contender")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--bootstrap-servers", help="use this cluster (default: a throwaway local broker)")
    ap.add_argument("--sweep", action="store_true", help=f"pipeline at (batch, wait ms) = {SWEEP}")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all contenders, interleaved; keep the best")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (bench/gpu_bench.py sets cuda)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--no-naive", action="store_true", help="leave out the one-at-a-time consumer")
    ap.add_argument("--replay", action="store_true", help="add `replay` of the backlog to a topic and to a Parquet file")
    ap.add_argument("--out", type=Path, help=f"JSON to write in bench/results (default: {OUT.name}, or pipeline_sweep.json with --sweep)")
    args = ap.parse_args(argv)
    args.out = RESULTS / (args.out.name if args.out else "pipeline_sweep.json" if args.sweep else OUT.name)
    settings_list = SWEEP if args.sweep else [(args.max_batch_size, args.max_wait_ms)]

    with broker(args.bootstrap_servers) as base:
        base = base.with_overrides(model=default_model_path(), device=args.device, dtype=args.dtype)
        runner = load_runner(base.model, task=base.task, device=base.device, dtype=base.dtype)
        runner.warmup()
        codec = Codec.from_settings(base)
        texts = sample_texts(args.count)
        sizes = sorted({b for b, _ in settings_list} | ({args.max_batch_size} if args.replay else set()))
        for bs in sizes:
            on_model_thread(bench_offline, runner, texts[:2 * bs], bs)  # warm the allocator and kernels at real shapes
        report = {"machine": machine_facts(sys.argv), "model": runner.info.name, "device": str(runner.device),
                  "dtype": str(next(runner.model.parameters()).dtype), "count": args.count, "rounds": args.rounds,
                  "partitions": PARTITIONS, "delivery": base.delivery, "cpu_workers": base.cpu_workers,
                  "kafka": base.bootstrap_servers}
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
            if not args.no_naive:
                print(f"[{rnd}] naive consumer ...", flush=True)
                runs.setdefault("naive", []).append(on_model_thread(bench_naive, base, runner, codec, texts))
            for kind in ("topic", "file") if args.replay else ():
                print(f"[{rnd}] replay to a {kind}, batch {args.max_batch_size}, wait {args.max_wait_ms:g} ms ...", flush=True)
                runs.setdefault(f"replay {kind}", []).append(
                    bench_replay(base, runner, texts, args.max_batch_size, args.max_wait_ms, kind))
        best = best_of(runs)
        report["offline"] = [v for k, v in best.items() if k.startswith("offline")]
        report["pipeline"] = [v for k, v in best.items() if k.startswith("pipeline")]
        report["naive"] = best.get("naive")
        if args.replay:
            report["replay"] = [v for k, v in best.items() if k.startswith("replay")]
    save(report, args.out.name)
    plot(report, args.out.with_suffix(".png"))  # next to the JSON
    m = report["machine"]
    print(f"\n{args.count} requests, {report['model']} on {report['device']}, {m['cpu_count']} CPUs, "
          f"torch {m['torch']} ({m['torch_threads']} threads), Kafka {report['kafka']}\n")
    print(pipeline_table(report))
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

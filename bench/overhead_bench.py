"""Kafka overhead: the inferlog pipeline with an echo model against a raw consume->produce loop.

    .venv/bin/python bench/overhead_bench.py [--count 20000] [--rounds 2] [--bootstrap-servers HOST:PORT]

The model does nothing (bench/echo_runner.py), so what is timed is the worker itself: Avro
decode, validation, batching, result building + Avro encode, exactly-once emit. The raw loop
is the practical limit of this broker and client on this machine: confluent-kafka
consume(500) -> produce the same bytes -> auto-committed offsets; no Avro, no transactions.
Contenders, on the same broker, the same 6-partition layout and the same records:
  raw loop                    consume -> produce, auto commit (at-least-once at best)
  raw loop + Avro             the same loop doing each record's unavoidable Avro work on the way:
                              decode + validate the request, build + encode its result (the
                              worker's own codec and ResultBuilder); still no batching, no
                              transactions: how much of the gap is the codec alone
  inferlog echo, exactly-once the Worker at its defaults (batch 32, wait 20 ms)
  inferlog echo, at-least-once the same with delivery=at-least-once (flush, then commit)
  inferlog echo, batch 256    exactly-once, max_batch_size 256, max_wait_ms 5
  inferlog echo, in-flight 8192, depth 8   exactly-once, max_in_flight 8192, pipeline_depth 8
  inferlog echo, inline stages exactly-once, stages=inline: every stage on the loop thread
The pipeline is timed as in pipeline_bench.py (assignment -> last commit), the raw loop from
assignment to its last delivered record. Saves bench/results/overhead.json and overhead.png.
"""
from __future__ import annotations

import argparse
import sys
import time

from report import overhead_table
from harness import RESULTS, best_of, blast, broker, fresh_settings, machine_facts, plot_bars, rates, save
from echo_runner import EchoRunner
from pipeline_bench import bench_pipeline

from confluent_kafka import Consumer, Producer as KafkaProducer

from inferlog.clients import confluent_config
from inferlog.codec import REQUEST, Codec
from inferlog.consumer.demo import sample_texts
from inferlog.consumer.records import BatchInfo, Pending
from inferlog.consumer.results import ResultBuilder
from inferlog.request import Limits, now_ms, validate_request

PIPELINES = {  # name: (max_batch_size, max_wait_ms, other settings)
    "inferlog echo, exactly-once": (32, 20.0, {}),
    "inferlog echo, at-least-once": (32, 20.0, {"delivery": "at-least-once"}),
    "inferlog echo, batch 256": (256, 5.0, {}),
    # the loop-cycle limits raised (BENCHMARKS.md, profile): more records between commits,
    # more batches in flight per loop turn
    "inferlog echo, in-flight 8192, depth 8": (32, 20.0, {"max_in_flight": 8192, "pipeline_depth": 8}),
    # every stage on the loop thread (issue 17): no pool, no device loop
    "inferlog echo, inline stages": (32, 20.0, {"stages": "inline"}),
}


def bench_raw(base, texts: list[str], codec: Codec | None = None) -> dict:
    """The loop one writes against the client alone: bytes in, the same bytes out. With a
    codec, each record is decoded and validated and answered with an encoded echo result."""
    s = fresh_settings(base, "raw-avro" if codec else "raw")
    answer = _avro_echo(s, codec) if codec else None
    blast(s, texts)
    prod = KafkaProducer(confluent_config(s, **{"enable.idempotence": True, "acks": "all", "linger.ms": 5,
                                                "compression.type": "lz4"}))
    t0 = [0.0, 0.0]

    def on_assign(consumer, parts):
        if not t0[0]:
            t0[0], t0[1] = time.perf_counter(), time.process_time()

    c = Consumer(confluent_config(s, **{"group.id": s.group_id, "auto.offset.reset": "earliest",
                                        "enable.auto.commit": True, "auto.commit.interval.ms": 100}))
    c.subscribe([s.tier_topic("normal")], on_assign=on_assign)
    n, done, deadline, first = len(texts), 0, time.monotonic() + 300, 0.0
    try:
        while done < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw loop: only {done} of {n} in time")
            for m in c.consume(500, 0.1):
                if m.error() is None:
                    first = first or time.perf_counter()
                    key, value = answer(m) if answer else (m.key(), m.value())
                    while True:
                        try:
                            prod.produce(s.model_results_topic, value, key)
                            break
                        except BufferError:
                            prod.poll(0.01)
                    done += 1
            prod.poll(0)
        if prod.flush(30):
            raise RuntimeError("raw loop: results not delivered")
        end = time.perf_counter()
        return {**rates(n, end - t0[0], time.process_time() - t0[1]), "steady_per_s": n / (end - first)}
    finally:
        c.close()


def _avro_echo(s, codec: Codec):
    """record -> (key, encoded result): the per-record codec work of the echo pipeline, one by one."""
    runner, limits = EchoRunner(), Limits.from_settings(s)
    builder, info = ResultBuilder(codec, s, runner.info), BatchInfo.new(1, 0)

    def answer(m):
        p = Pending(m.topic(), m.partition(), m.offset(), 0, m.key(), m.value(), m.headers(), now_ms())
        p.request = validate_request(codec.decode(p.value, expect=REQUEST), limits)
        out = builder.result(p, "OK", [{"vector": [float(len(p.request.inputs[0]))]}], info)
        return out.key, out.value

    return answer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bootstrap-servers")
    args = ap.parse_args(argv)
    texts, runner = sample_texts(args.count), EchoRunner()
    with broker(args.bootstrap_servers) as base:
        codec = Codec.from_settings(base)
        report = {"machine": machine_facts(sys.argv), "count": args.count, "partitions": 6, "rounds": args.rounds}
        runs: dict[str, list] = {}
        for rnd in range(1, args.rounds + 1):
            print(f"[{rnd}] raw loop ...", flush=True)
            runs.setdefault("raw loop", []).append(bench_raw(base, texts))
            print(f"[{rnd}] raw loop + Avro ...", flush=True)
            runs.setdefault("raw loop + Avro", []).append(bench_raw(base, texts, codec))
            for name, (bs, wait, extra) in PIPELINES.items():
                print(f"[{rnd}] {name} ...", flush=True)
                runs.setdefault(name, []).append(bench_pipeline(base, runner, codec, texts, bs, wait, **extra))
        report["contenders"] = best_of(runs)
    save(report, "overhead.json")
    m = report["machine"]
    c = report["contenders"]
    plot_bars(RESULTS / "overhead.png", f"Kafka overhead: echo model, {args.count} records, 6 partitions",
              list(c), [r["per_s"] for r in c.values()], "records / second (higher is better)",
              f"{m['date']}, {m['cpu_count']} CPUs, load 1m at start {m['loadavg_start'][0]:.1f}; best of {args.rounds} rounds")
    print("\n" + overhead_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

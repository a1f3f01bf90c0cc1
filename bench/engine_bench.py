"""The engine alone, without Kafka: records in, committed-ready outputs out, on the echo model.

    .venv/bin/python bench/engine_bench.py [--count 40000] [--rounds 3]

Feeds pre-encoded requests (the bench's usual texts, as the SDK encodes them) to an Engine
in chunks of 256, as the worker's loop does, steps it and releases its outputs until every
record is answered. No broker, no transactions: what is timed is decode, validation,
batching, offset bookkeeping, result building and encoding, and the threads between them.
Prints records/s and CPU µs per record, the same engine with every stage on one thread
(`stages = "inline"`: no CPU pool, no device loop; what the hand-offs between its threads cost
under one GIL), and the codec work alone (decode + validate + build
+ encode, one record at a time, on one thread) for comparison. Saves bench/results/engine.json.
"""
from __future__ import annotations

import argparse
import sys
import time

from echo_runner import EchoRunner
from harness import best_of, machine_facts, save
from report import engine_table

from inferlog.codec import REQUEST, Codec
from inferlog.consumer.demo import sample_texts
from inferlog.consumer.engine import Engine, start_up
from inferlog.consumer.records import BatchInfo, Pending
from inferlog.consumer.results import ResultBuilder
from inferlog.producer.sync import RequestEncoder
from inferlog.request import Limits, now_ms, validate_request
from inferlog.settings import Settings

CHUNK = 256


class Msg:
    """What the engine reads of a confluent_kafka.Message."""

    __slots__ = ("_t", "_p", "_o", "_k", "_v", "_h")

    def __init__(self, t, p, o, k, v, h):
        self._t, self._p, self._o, self._k, self._v, self._h = t, p, o, k, v, h

    def topic(self): return self._t  # noqa: E704
    def partition(self): return self._p  # noqa: E704
    def offset(self): return self._o  # noqa: E704
    def key(self): return self._k  # noqa: E704
    def value(self): return self._v  # noqa: E704
    def headers(self): return self._h  # noqa: E704


def run_engine(s, runner, codec, msgs: list[Msg], partitions: int) -> dict:
    eng = Engine(s, runner, codec)
    start_up(s, runner)  # as a driver does: the model's threads, the warm-up, the settled heap
    for p in range(partitions):
        eng.assign((s.requests_topic, p))
    n, out, i = len(msgs), 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    while out < n:
        if i < n and eng.pending < s.max_in_flight:
            eng.accept(msgs[i : i + CHUNK])
            i += CHUNK
        eng.wait(0.005)
        eng.step(flush=i >= n)
        outputs, _ = eng.release()
        out += len(outputs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    eng.close()
    return {"per_s": n / wall, "cpu_us_per_record": cpu / n * 1e6}


def run_codec(s, runner, codec, msgs: list[Msg]) -> dict:
    limits, builder, info = Limits.from_settings(s), ResultBuilder(codec, s, runner.info), BatchInfo.new(1, 0)
    t0, c0 = time.perf_counter(), time.process_time()
    for m in msgs:
        p = Pending(m.topic(), m.partition(), m.offset(), 0, m.key(), m.value(), m.headers(), now_ms())
        p.request = validate_request(codec.decode(p.value, expect=REQUEST), limits)
        builder.result(p, "OK", [{"vector": [1.0]}], info)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"per_s": len(msgs) / wall, "cpu_us_per_record": cpu / len(msgs) * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=40000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--bootstrap-servers", help="ignored: no broker is involved (run_all.py passes it to every step)")
    args = ap.parse_args(argv)
    s = Settings(bootstrap_servers="unused:9092")
    codec, runner = Codec.from_settings(s), EchoRunner()
    enc = RequestEncoder(s)
    msgs = []
    for i, t in enumerate(sample_texts(args.count)):
        e = enc.envelope("embed", t, metadata={"source": "bench"})
        msgs.append(Msg(s.requests_topic, i % args.partitions, i // args.partitions, e.key, e.value, e.headers))
    msgs.sort(key=lambda m: (m.offset(), m.partition()))
    runs: dict[str, list] = {"engine": [], "engine, one thread": [], "codec alone": []}
    for rnd in range(1, args.rounds + 1):
        runs["engine"].append(run_engine(s, runner, codec, msgs, args.partitions))
        runs["engine, one thread"].append(run_engine(s.with_overrides(stages="inline"), runner, codec, msgs,
                                                     args.partitions))
        runs["codec alone"].append(run_codec(s, runner, codec, msgs))
        print(f"[{rnd}] " + ", ".join(f"{k}: {v[-1]['per_s']:.0f} records/s, {v[-1]['cpu_us_per_record']:.1f} CPU µs/record"
                                      for k, v in runs.items()), flush=True)
    report = {"machine": machine_facts(sys.argv), "count": args.count, "contenders": best_of(runs)}
    save(report, "engine.json")
    print("\n" + engine_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B of open-loop latency at one fixed offered load: one contender per --set, same broker and texts.

    .venv/bin/python bench/latency_ab.py [--rate 90] [--duration 15] [--rounds 2] \
        --set "" --set INFERLOG_PIPELINE_DEPTH=1 --set OMP_NUM_THREADS=1 --set INFERLOG_MAX_WAIT_MS=50

Each --set is a comma-separated list of environment variables (NAME=VALUE) for an inferlog
worker process (bench/contenders.py inferlog: the default model, exactly-once, the settings'
defaults otherwise); "" is the defaults. For each round and contender: fresh topics, a warm-up,
then `rate` requests per second for `duration` seconds on a fixed schedule (peer_bench.open_loop),
and the end-to-end p50/p95/p99 from the requests' created_at to their committed results. Unlike
peer_bench.py, whose loads are fractions of each contender's own drain rate, every contender
here is offered the same load. Saves bench/results/latency_ab.json.
"""
from __future__ import annotations

import argparse
import sys

from echo_ab import parse_set
from harness import ResultMeter, avro_created_at, blast, broker, fresh_settings, machine_facts, save, spawn, stop
from peer_bench import open_loop

from inferlog.codec import Codec
from inferlog.consumer.demo import sample_texts

WARMUP = 64


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=90.0, help="requests per second offered to every contender")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per contender and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=None, help="NAME=VALUE,... (repeatable)")
    ap.add_argument("--bootstrap-servers")
    args = ap.parse_args(argv)
    sets = args.sets or [""]
    texts = sample_texts(1024)
    runs: dict[str, list] = {}
    with broker(args.bootstrap_servers) as base:
        codec = Codec.from_settings(base)
        for rnd in range(1, args.rounds + 1):
            for i, text in enumerate(sets):
                name = text or "defaults"
                env = {k: str(v) for k, v in parse_set(text).items()}
                s = fresh_settings(base, f"latency-ab-{i}")
                meter = ResultMeter(s, s.model_results_topic, avro_created_at(codec))
                proc = spawn("inferlog", s, env=env)
                try:
                    blast(s, texts[:WARMUP])
                    if not meter.wait_for(WARMUP, 180):
                        raise RuntimeError(f"{name}: no warm-up results in 180 s")
                    pt = open_loop(meter, s, texts, args.rate, int(args.rate * args.duration), 60 + 3 * args.duration)
                finally:
                    stop(proc)
                    meter.close()
                runs.setdefault(name, []).append(pt)
                print(f"[{rnd}] {name}: p50 {pt['p50_ms']:.0f} p95 {pt['p95_ms']:.0f} p99 {pt['p99_ms']:.0f} ms, "
                      f"load 1m {pt['loadavg_1m']:.1f}", flush=True)
    report = {"machine": machine_facts(sys.argv), "rate": args.rate, "duration_s": args.duration,
              "rounds": args.rounds, "contenders": runs}  # every round: their spread is the finding
    save(report, "latency_ab.json")
    print("\n| contender | p50 ms, each round | p95 ms | p99 ms |\n|---|---|---|---|")
    for name, rs in runs.items():
        cols = [" / ".join(f"{r[k]:.0f}" for r in rs) for k in ("p50_ms", "p95_ms", "p99_ms")]
        print(f"| {name} | " + " | ".join(cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B of worker settings on the echo model: one contender per --set, same broker and records.

    .venv/bin/python bench/echo_ab.py [--count 20000] [--rounds 1] \
        --set fetch_wait_max_ms=500 --set fetch_wait_max_ms=50 \
        --set commit_interval_ms=100 --set commit_interval_ms=0

Each --set is a comma-separated list of Settings fields (name=value, JSON values) applied to
the worker's defaults; each contender drains the same backlog through a Worker in this process
(pipeline_bench.bench_pipeline), rounds interleaved. Prints records/s per contender and saves
bench/results/echo_ab.json. The figures of BENCHMARKS.md's "What was fixed this round" came
from such sequences. To profile one: py-spy record --threads --format raw -o out.txt -- \
.venv/bin/python bench/echo_ab.py --count 40000, then bench/profile_pipeline.py --summarise out.txt.
"""
from __future__ import annotations

import argparse
import json
import sys

from echo_runner import EchoRunner
from harness import best_of, broker, machine_facts, save
from pipeline_bench import bench_pipeline

from inferlog.codec import Codec
from inferlog.consumer.demo import sample_texts


def parse_set(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="settings of one contender, e.g. fetch_wait_max_ms=50,max_in_flight=8192 (repeatable)")
    ap.add_argument("--bootstrap-servers")
    args = ap.parse_args(argv)
    sets = args.sets or [""]  # no --set: the defaults alone
    texts, runner = sample_texts(args.count), EchoRunner()
    runs: dict[str, list] = {}
    with broker(args.bootstrap_servers) as base:
        codec = Codec.from_settings(base)
        for rnd in range(1, args.rounds + 1):
            for text in sets:
                extra = parse_set(text)
                bs, wait = extra.pop("max_batch_size", base.max_batch_size), extra.pop("max_wait_ms", base.max_wait_ms)
                r = bench_pipeline(base, runner, codec, texts, bs, wait, **extra)
                runs.setdefault(text or "defaults", []).append(r)
                print(f"[{rnd}] {text or 'defaults'}: {r['per_s']:.0f} records/s "
                      f"(steady {r['steady_per_s']:.0f}, {r['commits']} commits)", flush=True)
    report = {"machine": machine_facts(sys.argv), "count": args.count, "contenders": best_of(runs)}
    save(report, "echo_ab.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

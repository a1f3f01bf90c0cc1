"""Scaling: one versus two worker processes, and the requests topic's partition count.

    .venv/bin/python bench/scaling_bench.py [--count 20000] [--partitions 1,2,6] [--workers 1,2]

The echo model (bench/echo_runner.py) keeps the model out of the figure: what scales or not
is the worker's own CPU work, against the broker on the same two cores. For each partition
count and worker count: fresh topics, the worker processes start (bench/contenders.py
inferlog --echo) and join one group, a backlog of --count records is produced at once, and
the rate is results per second between the first and last result a read_committed reader
sees. Saves bench/results/scaling.json and scaling.png.
"""
from __future__ import annotations

import argparse
import os
import sys

from report import scaling_table
from harness import RESULTS, ResultMeter, best_of, blast, broker, fresh_settings, machine_facts, save, spawn, stop, wait_group

from inferlog.consumer.demo import sample_texts


def point(base, texts: list[str], partitions: int, workers: int) -> dict:
    s = fresh_settings(base, f"scale-p{partitions}-w{workers}", partitions)
    meter = ResultMeter(s, s.results_topic)  # counts only: no decode in the timed path
    procs = []
    try:
        procs = [spawn("inferlog", s, "--echo") for _ in range(workers)]
        wait_group(s, s.group_id, workers)
        blast(s, texts)
        if not meter.wait_for(len(texts), 120 + len(texts) / 200):
            raise RuntimeError(f"{meter.count} of {len(texts)} results")
        return {"partitions": partitions, "workers": workers, "per_s": meter.rate(), "loadavg_1m": os.getloadavg()[0]}
    finally:
        for p in procs:
            stop(p)
        meter.close()


def plot(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    parts = sorted({p["partitions"] for p in report["points"]})
    workers = sorted({p["workers"] for p in report["points"]})
    width = 0.8 / len(workers)
    for i, w in enumerate(workers):
        ys = [next(p["per_s"] for p in report["points"] if p["partitions"] == n and p["workers"] == w) for n in parts]
        bars = ax.bar([j + i * width for j in range(len(parts))], ys, width, label=f"{w} worker process{'es' if w > 1 else ''}")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + width * (len(workers) - 1) / 2 for j in range(len(parts))], [f"{n} partitions" for n in parts])
    ax.set_ylabel("records / second (higher is better)")
    ax.set_title(f"Scaling, echo model, {report['count']} records (broker on the same 2 cores)")
    ax.legend()
    m = report["machine"]
    fig.text(0.01, 0.01, f"{m['date']}, load 1m at start {m['loadavg_start'][0]:.1f}", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--partitions", default="1,2,6")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bootstrap-servers")
    args = ap.parse_args(argv)
    texts = sample_texts(args.count)
    with broker(args.bootstrap_servers) as base:
        report = {"machine": machine_facts(sys.argv), "count": args.count, "rounds": args.rounds}
        runs: dict[tuple, list] = {}
        for rnd in range(1, args.rounds + 1):
            for n in map(int, args.partitions.split(",")):
                for w in map(int, args.workers.split(",")):  # alternating worker counts: load falls on both alike
                    print(f"[{rnd}] {n} partitions, {w} workers ...", flush=True)
                    runs.setdefault((n, w), []).append(point(base, texts, n, w))
                    print(f"    {runs[n, w][-1]['per_s']:.0f} records/s", flush=True)
        report["points"] = list(best_of({f"{n} {w}": v for (n, w), v in runs.items()}).values())
    save(report, "scaling.json")
    plot(report, RESULTS / "scaling.png")
    print("\n" + scaling_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""inferlog against a peer (Quix Streams): drain throughput, then latency under open-loop load.

    .venv/bin/python bench/peer_bench.py [--count 1024] [--rounds 2] [--duration 20]
                                         [--fractions 0.25,0.5,0.7,0.9] [--bootstrap-servers HOST:PORT]

Contenders, each a process of its own (bench/contenders.py) on its own fresh topics with the
same layout (6 partitions), the same model (all-MiniLM-L6-v2, CPU) and the same records:
  inferlog             the Worker at its defaults (batch 32, wait 20 ms, exactly-once)
  quix per message     Quix Streams Application, sdf.apply calls the model per message
  quix window 32       Quix's batching: group_by one key + tumbling_count_window(32).collect()
Quix runs with processing_guarantee="exactly-once" and inferlog's 100 ms commit interval.

Throughput: a backlog of --count requests is produced at once; the drain rate is results per
second between the first and the last result a read_committed reader sees (so group joins and
start-up do not count). Rounds interleave the contenders; the best round counts.
Latency: an open-loop producer offers each fraction of the contender's own saturation rate
(its best drain rate) for --duration seconds, and inferlog also the loads offered to quix per
message (latency at equal load); latency = the result's arrival at a
read_committed reader (= its commit, within the reader's 10 ms fetch wait) minus the request's
created_at. Saves bench/results/peer.json, peer_throughput.png and latency.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from report import peer_table
from harness import (ResultMeter, avro_created_at, best_of, blast, broker, fresh_settings, machine_facts, percentile,
                     plot_bars, save, spawn, stop, RESULTS)

from inferlog.codec import Codec
from inferlog.consumer.demo import sample_texts
from inferlog.producer.sync import Producer

WINDOW = 32
CONTENDERS = {  # name: (process kind, extra arguments, result decoder)
    "inferlog": ("inferlog", []),
    "quix per message": ("quix", []),
    f"quix window {WINDOW}": ("quix", ["--batch", str(WINDOW)]),
}


MATCH = "quix per message"


def json_created_at(value: bytes) -> float:
    return json.loads(value)["created_at"]


def whole_windows(n: int) -> int:
    """Counts are multiples of the window: a count window has no timeout, so a partial last
    window would wait forever (and the run would time out)."""
    return max(WINDOW, round(n / WINDOW) * WINDOW)


def drain(meter: ResultMeter, s, texts: list[str], timeout: float) -> dict:
    mark = meter.mark()
    blast(s, texts)
    if not meter.wait_for(mark + len(texts), timeout):
        raise RuntimeError(f"{meter.count - mark} of {len(texts)} results in {timeout:.0f}s")
    return {"per_s": meter.rate(mark), "loadavg_1m": os.getloadavg()[0]}


def open_loop(meter: ResultMeter, s, texts: list[str], rate: float, n: int, timeout: float) -> dict:
    """n requests at `rate` per second on a fixed schedule (open loop: a slow contender does not
    slow the offer down), then wait for all their results."""
    mark = meter.mark()
    with Producer(s) as prod:
        t0 = time.perf_counter()
        for i in range(n):
            if (d := t0 + i / rate - time.perf_counter()) > 0:
                time.sleep(d)
            prod.submit("embed", texts[i % len(texts)], metadata={"source": "bench"})
        sent_s = time.perf_counter() - t0
    ok = meter.wait_for(mark + n, timeout)
    lat = meter.latencies[mark:]
    return {"offered_per_s": rate, "sent_per_s": n / sent_s, "requests": n, "answered": len(lat), "complete": ok,
            "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
            "max_ms": max(lat, default=float("nan")), "loadavg_1m": os.getloadavg()[0]}


def plot_latency(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, c) in enumerate(report["contenders"].items()):
        pts = c["latency"]
        x = [p["offered_per_s"] for p in pts]
        ax.plot(x, [p["p50_ms"] for p in pts], "o-", color=f"C{i}", label=f"{name} p50")
        ax.plot(x, [p["p99_ms"] for p in pts], "s--", color=f"C{i}", alpha=0.7, label=f"{name} p99")
        ax.axvline(c["saturation_per_s"], color=f"C{i}", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests / second); dotted: each contender's saturation rate")
    ax.set_ylabel("end-to-end latency, created -> committed (ms, log scale)")
    ax.set_title(f"Latency under open-loop load ({report['model']}, CPU, 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    m = report["machine"]
    fig.text(0.01, 0.01, f"{m['date']}; load 1m at start {m['loadavg_start'][0]:.1f}\nloads at 25/50/70/90% of each "
             "contender's own drain rate; inferlog also at quix per message's loads", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1024, help="backlog per drain (rounded to whole windows)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load point")
    ap.add_argument("--fractions", default="0.25,0.5,0.7,0.9")
    ap.add_argument("--only", help="comma-separated contender names (default: all)")
    ap.add_argument("--bootstrap-servers")
    args = ap.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    names = args.only.split(",") if args.only else list(CONTENDERS)
    texts = sample_texts(whole_windows(args.count))
    with broker(args.bootstrap_servers) as base:
        codec = Codec.from_settings(base)
        report = {"machine": machine_facts(sys.argv), "model": "all-MiniLM-L6-v2", "count": len(texts),
                  "partitions": 6, "rounds": args.rounds, "duration_s": args.duration, "contenders": {}}
        procs, meters, sets = {}, {}, {}
        try:
            # All contenders start first and stay up: rounds and load points can then alternate
            # between them, and an idle contender costs next to no CPU.
            for name in names:
                kind, extra = CONTENDERS[name]
                s = sets[name] = fresh_settings(base, name.replace(" ", "-"))
                print(f"starting {name} ...", flush=True)
                meters[name] = ResultMeter(s, s.model_results_topic,
                                           avro_created_at(codec) if kind == "inferlog" else json_created_at)
                procs[name] = spawn(kind, s, *extra)
            for name in names:  # the first results mean the group has formed and the path is warm
                blast(sets[name], texts[:2 * WINDOW])
                if not meters[name].wait_for(2 * WINDOW, 180):
                    raise RuntimeError(f"{name}: no warm-up results in 180 s")
            runs: dict[str, list] = {}
            for rnd in range(1, args.rounds + 1):
                for name in names:
                    print(f"[{rnd}] drain {len(texts)}: {name} ...", flush=True)
                    runs.setdefault(name, []).append(drain(meters[name], sets[name], texts, 60 + len(texts) / 5))
                    print(f"    {runs[name][-1]['per_s']:.1f} req/s", flush=True)
            best = best_of(runs)
            for name in names:
                report["contenders"][name] = {"saturation_per_s": best[name]["per_s"], "drain": best[name], "latency": []}
            def point(name: str, rate: float) -> None:
                n = whole_windows(rate * args.duration)
                f = rate / best[name]["per_s"]
                print(f"open loop {name}: {rate:.0f} req/s ({f:.0%}) x {n} ...", flush=True)
                pt = open_loop(meters[name], sets[name], texts, rate, n, 60 + 3 * args.duration)
                report["contenders"][name]["latency"].append({"fraction": f, **pt})
                print(f"    p50 {pt['p50_ms']:.0f} ms, p99 {pt['p99_ms']:.0f} ms", flush=True)

            for f in fractions:
                for name in names:
                    point(name, f * best[name]["per_s"])
                    # inferlog also at the peer's own loads: latency compared at equal offered load
                    if name == MATCH and "inferlog" in names:
                        point("inferlog", f * best[name]["per_s"])
            for c in report["contenders"].values():
                c["latency"].sort(key=lambda p: p["offered_per_s"])
        finally:
            for p in procs.values():
                stop(p)
            for m in meters.values():
                m.close()
    save(report, "peer.json")
    sats = {n: c["saturation_per_s"] for n, c in report["contenders"].items()}
    m = report["machine"]
    plot_bars(RESULTS / "peer_throughput.png", f"Drain throughput, {report['model']} on CPU ({len(texts)} requests)",
              list(sats), list(sats.values()), "requests / second (higher is better)",
              f"{m['date']}, {m['cpu_count']} CPUs, load 1m at start {m['loadavg_start'][0]:.1f}; best of {args.rounds} rounds")
    plot_latency(report, RESULTS / "latency.png")
    print("\n" + peer_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

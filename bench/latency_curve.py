"""Latency under steady traffic: p50/p99 against offered load, as a share of the model alone.

    .venv/bin/python bench/latency_curve.py [--loads 0.15,0.3,0.45,0.6,0.75,0.9] [--schedules poisson,fixed]
        [--duration 20] [--only "inferlog adaptive,inferlog fixed,quix per message,quix window 32,bound"]

"The model alone" is the default model (all-MiniLM-L6-v2, CPU) called directly, no Kafka, on
the bench's texts in arrival-order batches of 32, with torch's default threads (one per core);
it is measured first, in this process, with the model's cost per batch size (its cost curve),
and again with the threads the worker gives the model (INFERLOG_TORCH_THREADS, by default the
cores less one), against which the worker's device time per batch is compared. Every load is a share of that rate, the
same for every contender. Then, per contender, one process on fresh topics (6 partitions), a
warm-up of 256 requests (a fresh broker's first minute is not its steady state), the drain
rate of a 1,024-request backlog (inferlog only: its throughput must not fall), and for each
load and schedule (Poisson arrivals, seeded; or a fixed interval) `--duration` seconds of open
-loop traffic. Latency is from a request's created_at to the moment a read_committed reader
sees its result.

Contenders:
  inferlog adaptive   the worker's defaults (batching "adaptive", latency target 300 ms)
  inferlog fixed      INFERLOG_BATCHING=fixed: cut at max_batch_size or max_wait_ms (20 ms)
  quix per message    Quix Streams, the model per message (bench/contenders.py)
  quix window 32      Quix Streams' count window of 32 (no timeout: it waits for 32)
  bound               no process: the same arrival schedule through an ideal server simulated
                      on the measured cost curve (the faster of the two thread counts at each
                      size; when the model is free it takes everything queued, up to 32; no
                      Kafka, no decode, no commit)

For inferlog each point also gives the timeline of its requests (from the result's own
timings: created -> consumed -> completed -> visible) and the worker's stage histograms over
the point (/metrics): where the time goes. Saves bench/results/latency_curve.json and
latency_curve.png; prints the curve, each contender's SLA capacity (the highest load whose
p99 is within --sla-ms) and the timelines.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import urllib.request

from harness import (RESULTS, ResultMeter, _epoch_ms, broker, fresh_settings, free_port, machine_facts,
                     on_model_thread, percentile, save, spawn, stop)
from peer_bench import json_created_at, whole_windows

from inferlog.codec import RESULT, Codec
from inferlog.consumer.demo import sample_texts
from inferlog.consumer.runners import Row, load_runner
from inferlog.producer.sync import Producer
from inferlog.request import Parameters
from inferlog.settings import default_model_path

WARMUP = 256
DRAIN = 1024
SIZES = (1, 2, 4, 8, 16, 32)
CONTENDERS = {  # name: (process kind, extra arguments, environment)
    "inferlog adaptive": ("inferlog", [], {}),
    "inferlog fixed": ("inferlog", [], {"INFERLOG_BATCHING": "fixed"}),
    "quix per message": ("quix", [], {}),
    "quix window 32": ("quix", ["--batch", "32"], {}),
    "bound": (None, [], {}),
}
# the worker's histograms read per point: stage (per chunk, request, batch or commit), waits for a thread
STAGES = ("queue", "prepare", "infer", "finish", "commit")
WAITS = ("cpu", "device")


# -- the model alone -------------------------------------------------------------------------
def cost_curve(texts: list[str], threads: int, reps: int = 5) -> dict:
    """Seconds per batch of n (median of `reps`) and the arrival-order rate in batches of 32,
    with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    runner = load_runner(default_model_path())
    runner.warmup()
    params = Parameters()

    def embed(batch: list[str]) -> None:
        prepared = runner.prepare([Row(ids, params) for ids in runner.tokenize(batch)])
        runner.finish(runner.run(prepared), prepared)

    curve = {}
    for n in SIZES:
        times = []
        for r in range(reps):
            batch = texts[r * n:(r + 1) * n]
            t0 = time.perf_counter()
            on_model_thread(embed, batch)
            times.append(time.perf_counter() - t0)
        curve[n] = sorted(times)[reps // 2]
    t0 = time.perf_counter()
    for i in range(0, 256, 32):
        on_model_thread(embed, texts[i:i + 32])
    alone = 256 / (time.perf_counter() - t0)
    del runner
    return {"threads": threads, "seconds_per_batch": curve, "alone_per_s": alone}


def batch_seconds(curve: dict, n: int) -> float:
    """The cost curve between its measured sizes (linear)."""
    sizes = sorted(curve)
    if n <= sizes[0]:
        return curve[sizes[0]]
    for a, b in zip(sizes, sizes[1:]):
        if n <= b:
            return curve[a] + (curve[b] - curve[a]) * (n - a) / (b - a)
    return curve[sizes[-1]] * n / sizes[-1]


def ideal_server(arrivals: list[float], curve: dict, max_batch: int = 32) -> list[float]:
    """Latencies (s) of an ideal batcher on the cost curve: when the model is free it takes
    everything queued (up to max_batch), at once; a request arriving to a free model starts."""
    lat, free, i, n = [], 0.0, 0, len(arrivals)
    while i < n:
        start = max(free, arrivals[i])
        j = i
        while j < n and j - i < max_batch and arrivals[j] <= start:
            j += 1
        free = start + batch_seconds(curve, j - i)
        lat += [free - a for a in arrivals[i:j]]
        i = j
    return lat


# -- the offered load ------------------------------------------------------------------------
def schedule(kind: str, rate: float, n: int, seed: int) -> list[float]:
    """Send times (s from the start) of n requests at `rate`: a fixed interval, or Poisson."""
    if kind == "fixed":
        return [i / rate for i in range(n)]
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def offer(prod: Producer, meter: ResultMeter, texts: list[str], times: list[float], timeout: float) -> tuple[int, bool]:
    """Send on the schedule (open loop) with a producer that is up already (a new one spends
    its first ~0.5 s connecting and getting its producer id: the first requests of a point
    then looked 500 ms slow), then wait for every result. Returns the meter's mark."""
    mark = meter.mark()
    t0 = time.perf_counter()
    for i, at in enumerate(times):
        if (d := t0 + at - time.perf_counter()) > 0:
            time.sleep(d)
        prod.submit("embed", texts[i % len(texts)], metadata={"source": "bench"})
    prod.flush()
    return mark, meter.wait_for(mark + len(times), timeout)


def scrape(port: int | None) -> dict:
    """The worker's histogram sums and counts, keyed (metric, label)."""
    if not port:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name.endswith(("_sum", "_count")):
                label = smp.labels.get("stage") or smp.labels.get("executor") or smp.labels.get("tier") or ""
                out[(smp.name, label)] = smp.value
    return out


def stage_means(before: dict, after: dict) -> dict:
    """Mean ms per observation over the point, for each stage and wait, and the mean batch size."""
    def mean(metric: str, label: str) -> float | None:
        n = after.get((f"{metric}_count", label), 0) - before.get((f"{metric}_count", label), 0)
        t = after.get((f"{metric}_sum", label), 0) - before.get((f"{metric}_sum", label), 0)
        return t / n if n else None

    out = {f"{st}_ms": (m * 1000 if (m := mean("inferlog_stage_seconds", st)) is not None else None) for st in STAGES}
    for w in WAITS:
        m = mean("inferlog_executor_queue_wait_seconds", w)
        out[f"wait_{w}_ms"] = None if m is None else m * 1000
    out["batch_size"] = mean("inferlog_batch_size", "")
    return out


def timeline(codec: Codec, values: list[bytes], arrivals: list[float]) -> dict:
    """Median ms of each segment of the requests' path, from their results' own timings."""
    seg: dict[str, list[float]] = {"fetch": [], "process": [], "commit": []}
    total = []
    for v, seen in zip(values, arrivals):
        t = codec.decode(v, expect=RESULT)["timings"]
        created, consumed, completed = _epoch_ms(t["created_at"]), _epoch_ms(t["consumed_at"]), _epoch_ms(t["completed_at"])
        seg["fetch"].append(consumed - created)  # produced, fetched, handed to the engine
        seg["process"].append(completed - consumed)  # decode, queue, the batch's stages up to its result
        seg["commit"].append(seen - completed)  # waiting for and in the transaction, then visible
        total.append(seen - created)
    # the slowest 1%: which segment their time is in
    p99 = percentile(total, 99)
    tail = [i for i, x in enumerate(total) if x >= p99]
    return {f"{k}_p50_ms": percentile(x, 50) for k, x in seg.items()} | \
           {f"{k}_mean_ms": sum(x) / len(x) for k, x in seg.items() if x} | \
           {f"{k}_tail_ms": sum(x[i] for i in tail) / len(tail) for k, x in seg.items() if tail}


def summary(lat_ms: list[float], requests: int, complete: bool) -> dict:
    return {"requests": requests, "answered": len(lat_ms), "complete": complete,
            "p50_ms": percentile(lat_ms, 50), "p95_ms": percentile(lat_ms, 95), "p99_ms": percentile(lat_ms, 99),
            "loadavg_1m": os.getloadavg()[0]}


# -- the report --------------------------------------------------------------------------------
def sla_capacity(points: list[dict], sla_ms: float) -> float | None:
    """The highest share of the model alone whose p99 met the SLA, every lower one meeting it too."""
    best = None
    for p in sorted(points, key=lambda p: p["share"]):
        if not p["complete"] or p["p99_ms"] > sla_ms:
            break
        best = p["share"]
    return best


def tables(report: dict) -> str:
    sla = report["sla_ms"]
    alone = report["model_alone"]["alone_per_s"]
    lines = []
    for key in ("model_alone", "model_alone_worker_threads"):
        m = report.get(key)
        if m and (key == "model_alone" or m["threads"] != report["model_alone"]["threads"]):
            lines.append(f"The model alone, {m['threads']} torch thread(s): {m['alone_per_s']:.1f} req/s; cost per batch "
                         "(ms): " + ", ".join(f"{n}: {s * 1000:.0f}" for n, s in m["seconds_per_batch"].items()))
    lines.append("")
    for sched in report["schedules"]:
        lines += [f"**{sched} arrivals**: p50 / p99 ms", "",
                  "| contender | " + " | ".join(f"{f:.0%} ({f * alone:.0f}/s)" for f in report["loads"]) + " |",
                  "|---|" + "---:|" * len(report["loads"])]
        for name, c in report["contenders"].items():
            pts = {p["share"]: p for p in c["points"] if p["schedule"] == sched}
            cells = []
            for f in report["loads"]:
                p = pts.get(f)
                cells.append("" if p is None else f"{p['p50_ms']:.0f} / {p['p99_ms']:.0f}" + ("" if p["complete"] else " (incomplete)"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"SLA capacity: the highest load with p99 <= {sla:.0f} ms (share of the model alone)", "",
              "| contender | " + " | ".join(report["schedules"]) + " | drain req/s (/ model alone) |", "|---|" +
              "---:|" * (len(report["schedules"]) + 1)]
    for name, c in report["contenders"].items():
        caps = []
        for sched in report["schedules"]:
            cap = sla_capacity([p for p in c["points"] if p["schedule"] == sched], sla)
            caps.append("none" if cap is None else f"{cap:.0%} ({cap * alone:.0f}/s)")
        d = c.get("drain_per_s")
        lines.append(f"| {name} | " + " | ".join(caps) + f" | {'' if d is None else f'{d:.0f} ({d / alone:.2f}x)'} |")
    lines += ["", "Timeline (inferlog; medians of each request's segments, ms; stage means from /metrics, ms)", "",
              "| contender | load | fetch | process | commit+visible | queue | wait cpu | prepare | wait device | infer | "
              "finish | commit | batch | infer / alone (worker's threads) |", "|---|---|" + "---:|" * 12]
    for name, c in report["contenders"].items():
        for p in c["points"]:
            if "timeline" not in p:
                continue
            t, m = p["timeline"], p["stages"]
            cell = lambda v, fmt="{:.0f}": "" if v is None else fmt.format(v)  # noqa: E731
            lines.append(f"| {name} | {p['schedule']} {p['share']:.0%} | {cell(t['fetch_p50_ms'])} | {cell(t['process_p50_ms'])} | "
                         f"{cell(t['commit_p50_ms'])} | {cell(m['queue_ms'])} | {cell(m['wait_cpu_ms'], '{:.1f}')} | "
                         f"{cell(m['prepare_ms'])} | {cell(m['wait_device_ms'], '{:.1f}')} | {cell(m['infer_ms'])} | "
                         f"{cell(m['finish_ms'])} | {cell(m['commit_ms'])} | {cell(m['batch_size'], '{:.1f}')} | "
                         f"{cell(m.get('infer_vs_alone'), '{:.2f}x')} |")
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scheds = report["schedules"]
    fig, axes = plt.subplots(1, len(scheds), figsize=(7 * len(scheds), 5), squeeze=False, sharey=True)
    for ax, sched in zip(axes[0], scheds):
        for i, (name, c) in enumerate(report["contenders"].items()):
            pts = sorted((p for p in c["points"] if p["schedule"] == sched), key=lambda p: p["share"])
            x = [p["share"] * 100 for p in pts]
            ax.plot(x, [p["p50_ms"] for p in pts], "o-", color=f"C{i}", label=f"{name} p50")
            ax.plot(x, [p["p99_ms"] for p in pts], "s--", color=f"C{i}", alpha=0.7, label=f"{name} p99")
        ax.axhline(report["sla_ms"], color="0.4", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel(f"offered load, % of the model alone ({report['model_alone']['alone_per_s']:.0f} req/s)")
        ax.set_title(f"{sched} arrivals")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("created -> visible to a read_committed reader (ms, log)")
    axes[0][-1].legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"Latency under steady traffic (all-MiniLM-L6-v2, CPU); dotted: the {report['sla_ms']:.0f} ms SLA")
    fig.text(0.01, 0.01, f"{m['date']}, {m['cpu_count']} CPUs, load 1m at start {m['loadavg_start'][0]:.1f}", fontsize=8,
             color="0.3")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", default="0.05,0.1,0.2,0.3,0.45,0.6,0.75,0.9",
                    help="shares of the model alone; a contender whose p99 passed 10x the SLA (or that did not "
                         "answer everything in time) is not offered the higher ones")
    ap.add_argument("--schedules", default="poisson,fixed")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of traffic per point")
    ap.add_argument("--sla-ms", type=float, default=300.0)
    ap.add_argument("--drain-rounds", type=int, default=2, help="backlog drains per inferlog contender (best counts)")
    ap.add_argument("--only", help="comma-separated contender names (default: all)")
    ap.add_argument("--out", default="latency_curve", help="name of the saved .json and .png")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the inferlog contenders (repeatable; for experiments)")
    ap.add_argument("--bootstrap-servers")
    args = ap.parse_args(argv)
    extra_env = dict(e.split("=", 1) for e in args.env)
    loads = [float(f) for f in args.loads.split(",")]
    scheds = args.schedules.split(",")
    names = args.only.split(",") if args.only else list(CONTENDERS)
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders {sorted(unknown)}; choose from {list(CONTENDERS)}")
    texts = sample_texts(DRAIN)
    import torch

    from inferlog.consumer.runners import model_threads

    # The loads are shares of the model alone as torch runs it by default (a thread per core);
    # a batch's device time in the worker is compared with the same batch alone on the threads
    # the worker gives the model (INFERLOG_TORCH_THREADS; by default the cores less one).
    default_threads = torch.get_num_threads()
    worker_threads = model_threads(int(extra_env.get("INFERLOG_TORCH_THREADS", os.environ.get("INFERLOG_TORCH_THREADS", "0"))))
    curves = {}
    for threads in dict.fromkeys((default_threads, worker_threads)):
        print(f"the model alone, {threads} torch thread(s) ...", flush=True)
        curves[threads] = c = cost_curve(texts, threads)
        print(f"    {c['alone_per_s']:.1f} req/s; " + ", ".join(f"{n}: {x * 1000:.0f} ms" for n, x in c["seconds_per_batch"].items()),
              flush=True)
    torch.set_num_threads(default_threads)
    alone, same = curves[default_threads], curves[worker_threads]
    rate0 = alone["alone_per_s"]
    report = {"machine": machine_facts(sys.argv), "model_alone": alone, "model_alone_worker_threads": same,
              "loads": loads, "schedules": scheds,
              "duration_s": args.duration, "sla_ms": args.sla_ms, "contenders": {}}
    for name in names:
        report["contenders"][name] = {"points": []}
    # the bound runs each batch at the model's best alone, whichever thread count gave it
    best = {n: min(c["seconds_per_batch"][n] for c in curves.values()) for n in SIZES}
    if "bound" in names:  # the schedules through the cost curve
        for sched in scheds:
            for f in loads:
                n = int(f * rate0 * args.duration)
                lat = [x * 1000 for x in ideal_server(schedule(sched, f * rate0, n, seed=n), best)]
                report["contenders"]["bound"]["points"].append({"schedule": sched, "share": f, **summary(lat, n, True)})
    live = [n for n in names if CONTENDERS[n][0] is not None]
    with broker(args.bootstrap_servers) as base:
        codec = Codec.from_settings(base)
        run: dict[str, dict] = {}  # name: settings, process, meter, producer, metrics port
        try:
            # All contenders start first and stay up (an idle one costs next to no CPU), so the
            # drains and the load points can alternate between them: a broker warming up or a
            # busy minute of the machine then falls on all of them alike.
            for name in live:
                kind, extra, env = CONTENDERS[name]
                s = fresh_settings(base, "curve-" + name.replace(" ", "-"))
                port = free_port() if kind == "inferlog" else None
                if kind == "inferlog":
                    env = {**extra_env, **env, "INFERLOG_METRICS_PORT": str(port)}
                meter = ResultMeter(s, s.model_results_topic, json_created_at if kind == "quix" else
                                    (lambda v: _epoch_ms(codec.decode(v, expect=RESULT)["timings"]["created_at"])),
                                    keep=kind == "inferlog")
                print(f"starting {name} ...", flush=True)
                run[name] = {"s": s, "meter": meter, "port": port, "kind": kind, "batch": bool(extra),
                             "proc": spawn(kind, s, *extra, env=env), "prod": Producer(s)}
            for name, r in run.items():
                for t in texts[:WARMUP]:
                    r["prod"].submit("embed", t, metadata={"source": "bench"})
                r["prod"].flush()
                if not r["meter"].wait_for(WARMUP, 240):
                    raise RuntimeError(f"{name}: no warm-up results in 240 s")
            for rnd in range(args.drain_rounds):  # inferlog's throughput must not fall: a backlog, drained
                for name, r in run.items():
                    if r["kind"] != "inferlog":
                        continue
                    mark = r["meter"].mark()
                    for t in texts:
                        r["prod"].submit("embed", t, metadata={"source": "bench"})
                    r["prod"].flush()
                    if not r["meter"].wait_for(mark + DRAIN, 120 + DRAIN / 5):
                        raise RuntimeError(f"{name}: the drain did not finish")
                    c = report["contenders"][name]
                    c.setdefault("drain_rounds", []).append(r["meter"].rate(mark))
                    c["drain_per_s"] = max(c["drain_rounds"])
                    print(f"    drain {name}: {c['drain_rounds'][-1]:.1f} req/s "
                          f"({c['drain_rounds'][-1] / rate0:.2f}x the model alone)", flush=True)
            for sched in scheds:
                past = set()  # contenders that fell behind at a lower load of this schedule
                for f in loads:
                    for name, r in run.items():
                        if name in past:
                            continue
                        n = int(f * rate0 * args.duration)
                        if r["batch"]:
                            n = whole_windows(n)  # a count window has no timeout: whole windows only
                        before = scrape(r["port"])
                        mark, ok = offer(r["prod"], r["meter"], texts, schedule(sched, f * rate0, n, seed=n),
                                         60 + 3 * args.duration)
                        pt = {"schedule": sched, "share": f, **summary(r["meter"].latencies[mark:], n, ok)}
                        if r["kind"] == "inferlog":
                            pt["stages"] = st = stage_means(before, scrape(r["port"]))
                            pt["timeline"] = timeline(codec, r["meter"].values[mark:], r["meter"].arrivals[mark:])
                            if st["infer_ms"] and st["batch_size"]:
                                st["infer_vs_alone"] = st["infer_ms"] / 1000 / batch_seconds(same["seconds_per_batch"],
                                                                                             st["batch_size"])
                        report["contenders"][name]["points"].append(pt)
                        if not ok or pt["p99_ms"] > 10 * args.sla_ms:  # past its capacity: higher loads only queue
                            past.add(name)
                        tl = pt.get("timeline")
                        print(f"    {name} {sched} {f:.0%} ({f * rate0:.0f}/s): p50 {pt['p50_ms']:.0f} p99 {pt['p99_ms']:.0f} ms"
                              + ("" if ok else f" INCOMPLETE {pt['answered']}/{n}")
                              + (f"; {tl['fetch_p50_ms']:.0f} fetch, {tl['process_p50_ms']:.0f} process, "
                                 f"{tl['commit_p50_ms']:.0f} commit (slowest 1%: "
                                 + "/".join(f"{tl[k + '_tail_ms']:.0f}" for k in ("fetch", "process", "commit"))
                                 + f"); batch {pt['stages']['batch_size'] or 0:.1f}" if tl else ""), flush=True)
        finally:
            for r in run.values():
                r["prod"].close()
                stop(r["proc"])
                r["meter"].close()
    save(report, f"{args.out}.json")
    plot(report, RESULTS / f"{args.out}.png")
    print("\n" + tables(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

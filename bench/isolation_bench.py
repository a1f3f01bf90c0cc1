"""Isolation between served models: one model flooded with a backlog while a steady stream runs on the other.

    .venv/bin/python bench/isolation_bench.py [--sleep-ms 50] [--rate 100] [--duration 20] [--backlog 20000]
        [--rounds 2] [--seed 1] [--quick] [--bootstrap-servers HOST:PORT]

The goal (the issue's): while model-a has a backlog, model-b's p99 stays within 1.2x of its p99
alone. Each served model has its own request topics and its own consumer group
(Settings.model_topics, worker_group); results share one topic and carry their model's name.

Setup: one broker, one topic prefix (fresh_settings), two served names "model-a" and
"model-b", each with its topics (ensure_topics) and served by one worker process
(bench/contenders.py inferlog --sleep-ms, its Settings' model_name set). The model is
bench/echo_runner.SleepRunner: run() sleeps --sleep-ms per batch and costs no CPU, a GPU per
model (one worker tops out at max_batch_size / sleep, 32 / 50 ms = 640 req/s). A CPU model
cannot show isolation on this 2-core machine, only two workers splitting the same cores.

Phases, each the same seeded Poisson stream of embed requests naming model-b (the SDK's
Producer, check against the model registry included) at --rate for --duration s:
  alone     model-a idle.
  flooded   first --backlog requests naming model-a are encoded and sent as fast as the client
            goes (harness.send_all), then the stream on model-b; model-a drains meanwhile. Its
            whole backlog is drained before the next phase, so an "alone" is alone.
Order: alone, then (flooded, alone) x --rounds, so drift of the machine or the broker over the
run shows in the alone phases around each flooded one; after a warm-up of --warmup s of both.

Latency: created_at (set at submit) to the moment a read_committed reader of the models' results
topics sees the result. The reader stamps arrivals and keeps each record's key (the request id) and
value; which model a result belongs to is known from its key during the run, and the values
are decoded after each phase (no decoding on the shared cores while timing), where a result of
model-b counts only if its model.name is "model-b" (a mismatch is reported). Per phase also
model-a's results per second over model-b's stream window and what of its backlog was left when
the stream ended (it must be > 0, or model-a was no longer flooded for the whole phase), and the
cores each worker, the broker and the whole machine used over the window.

How to read it: `ratio` is a flooded phase's p99 over the mean p99 of the alone phases just
before and after it; within 1.2x meets the goal. An alone p99 that moves a lot between rounds
says the machine was disturbed (others' load): compare the flooded p99 with its neighbours.
With 2 cores the flooded model's worker, the broker and this process take CPU that model-b's
worker then waits for. Each model has its own results topic (a read_committed reader sees
nothing on a partition past a transaction still open there, so one shared topic let model-a's
commits hold model-b's results back): the "visible" segment (completed -> seen) shows what is
left of that, "process" the worker's own wait for the CPU. Saves bench/results/isolation.json and isolation.png.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter

from harness import (RESULTS, ResultMeter, _epoch_ms, broker, fresh_settings, machine_facts, percentile, plot_bars,
                     read_committed, save, send_all, spawn, stop, wait_group)
from scaling_bench import cpu_s, listener_pid, machine_busy_s

from inferlog.codec import DEADLETTER, RESULT, Codec
from inferlog.consumer.demo import sample_texts
from inferlog.producer.sync import Producer, RequestEncoder
from inferlog.topics import ensure_topics

MODELS = ("model-a", "model-b")  # flooded, steady
GOAL = 1.2  # flooded p99 / alone p99


class KeyedMeter(ResultMeter):
    """ResultMeter (keep=True) that also keeps each record's key, the request id: a result is
    known as model-a's or model-b's while the run goes on, without decoding it."""

    def __init__(self, settings, topic: str, **kw):
        super().__init__(settings, topic, keep=True, keep_keys=True, **kw)

    def wait_ids(self, ids: set[bytes], since: int, timeout: float) -> bool:
        """Until a result for every id in `ids` arrived after index `since`."""
        found, i, deadline = set(), since, time.monotonic() + timeout
        while True:
            n = len(self.keys)
            found.update(k for k in self.keys[i:n] if k in ids)
            i = n
            if len(found) >= len(ids):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def poisson(rate: float, duration: float, seed: int) -> list[float]:
    """Send times (s from the start) of a Poisson stream at `rate` over `duration` s, seeded."""
    rng, t, out = random.Random(seed), 0.0, []
    while (t := t + rng.expovariate(rate)) < duration:
        out.append(t)
    return out


def stream(prod: Producer, texts: list[str], times: list[float], model: str) -> list[str]:
    """Open loop: each request submitted at its time whatever the workers do; returns the ids."""
    ids = []
    t0 = time.perf_counter()
    for i, at in enumerate(times):
        if (d := t0 + at - time.perf_counter()) > 0:
            time.sleep(d)
        ids.append(prod.submit("embed", texts[i % len(texts)], model=model, metadata={"source": "bench"}))
    prod.flush()
    return ids


class Cores:
    """CPU of the two workers, the broker (a local one) and the whole machine over a window, in cores."""

    def __init__(self, procs: dict, broker_pid: int | None):
        self.procs, self.broker_pid = procs, broker_pid

    def snap(self) -> dict:
        pids = {**{k: p.pid for k, p in self.procs.items()}, **({"broker": self.broker_pid} if self.broker_pid else {})}
        out = {}
        for k, pid in pids.items():
            try:
                out[k] = cpu_s(pid)
            except OSError:  # gone
                pass
        return {**out, "machine": machine_busy_s(), "wall": time.monotonic()}

    @staticmethod
    def used(a: dict, b: dict) -> dict:
        wall = b["wall"] - a["wall"]
        return {k: (b[k] - a[k]) / wall for k in a if k != "wall" and k in b}


def phase(kind: str, n: int, ctx: dict, args) -> dict:
    meter_a, meter = ctx["meters"][MODELS[0]], ctx["meters"][MODELS[1]]  # each model's own reader
    a_ids: set[bytes] = set()
    blast_s = None
    if kind == "flooded":
        envs = [ctx["enc"].envelope("embed", t, model=MODELS[0], metadata={"source": "bench"})
                for t in (ctx["texts"][i % len(ctx["texts"])] for i in range(args.backlog))]
        a_ids = {e.request_id.encode() for e in envs}
    mark, mark_a = len(meter.keys), len(meter_a.keys)
    if kind == "flooded":
        blast_s = send_all(ctx["s"], envs)  # the backlog is on model-a's topics before the stream starts
    c0, t_start = ctx["cores"].snap(), time.time() * 1000
    b_ids = stream(ctx["prod"], ctx["texts"], ctx["times"], MODELS[1])
    c1, t_end = ctx["cores"].snap(), time.time() * 1000
    b_set = {i.encode() for i in b_ids}
    complete = meter.wait_ids(b_set, mark, 60 + 3 * args.duration)
    drained = True
    if a_ids:  # all of it, so the next alone phase is alone
        drained = meter_a.wait_ids(a_ids, mark_a, 120 + 3 * args.backlog * args.sleep_ms / 1000 / 32)
    # decode now, off the clock
    n_keys, n_keys_a = len(meter.keys), len(meter_a.keys)
    lat, wrong, a_in_window, a_by_end, a_seen = [], {}, 0, 0, 0
    seg: dict[str, list[float]] = {"fetch": [], "process": [], "visible": []}
    codec: Codec = ctx["codec"]
    for k, v, at in zip(meter.keys[mark:n_keys], meter.values[mark:n_keys], meter.arrivals[mark:n_keys]):
        if k in b_set:
            r = codec.decode(v, expect=RESULT)
            name = r["model"]["name"]
            if name != MODELS[1]:
                wrong[name] = wrong.get(name, 0) + 1
                continue
            tm = r["timings"]
            created, consumed, completed = (_epoch_ms(tm[f]) for f in ("created_at", "consumed_at", "completed_at"))
            lat.append(at - created)
            seg["fetch"].append(consumed - created)  # produced, fetched, handed to the engine
            seg["process"].append(completed - consumed)  # decode, batching, the device, the result
            seg["visible"].append(at - completed)  # the transaction, then visible to read_committed
    for k, v, at in zip(meter_a.keys[mark_a:n_keys_a], meter_a.values[mark_a:n_keys_a],
                        meter_a.arrivals[mark_a:n_keys_a]):
        if k in a_ids:
            a_seen += 1
            if a_seen <= 50:  # a sample is enough to check the name
                name = codec.decode(v, expect=RESULT)["model"]["name"]
                if name != MODELS[0]:
                    wrong[name] = wrong.get(name, 0) + 1
            a_by_end += at <= t_end
            a_in_window += t_start <= at <= t_end
    window_s = (t_end - t_start) / 1000
    out = {"phase": f"{kind} {n}", "kind": kind, "b_requests": len(b_ids), "b_answered": len(lat),
           "complete": complete, "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95),
           "p99_ms": percentile(lat, 99), "max_ms": max(lat, default=float("nan")), "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
           "window_s": window_s, "cores": Cores.used(c0, c1), "loadavg_1m": os.getloadavg()[0], "wrong_model_name": wrong,
           # where model-b's time went: each segment's p50 and p99 over its requests
           "segments_ms": {k: {"p50": percentile(x, 50), "p99": percentile(x, 99)} for k, x in seg.items()}}
    if kind == "flooded":
        out |= {"backlog": args.backlog, "blast_s": blast_s, "a_results_in_window": a_in_window,
                "a_per_s_in_window": a_in_window / window_s, "a_left_at_stream_end": args.backlog - a_by_end,
                "a_drained": drained, "a_answered": a_seen}
    return out


def deadletters(s, codec: Codec, timeout: float = 30) -> dict[str, int]:
    """The dead letters (read_committed: the end offsets also count transaction markers), by
    reason and source topic: none is expected."""
    try:
        dead = [d for m in MODELS  # each model's own
                for d in read_committed(s, s.model_outputs(m)[1], lambda v: codec.decode(v, expect=DEADLETTER), timeout)]
    except TimeoutError:
        return {"(not read to the end)": 1}
    return dict(Counter(f"{d['reason']} from {d['source']['topic']}" for d in dead))


def ratios(phases: list[dict]) -> list[dict]:
    """Each flooded phase against the mean p99 of the alone phases just before and after it."""
    out = []
    for i, p in enumerate(phases):
        if p["kind"] != "flooded":
            continue
        near = [q["p99_ms"] for q in (phases[i - 1] if i else None, phases[i + 1] if i + 1 < len(phases) else None)
                if q is not None and q["kind"] == "alone"]
        ref = sum(near) / len(near)
        out.append({"phase": p["phase"], "flooded_p99_ms": p["p99_ms"], "alone_p99_ms": near, "alone_ref_ms": ref,
                    "ratio": p["p99_ms"] / ref, "within_goal": p["p99_ms"] / ref <= GOAL and p["complete"]})
    return out


def table(report: dict) -> str:
    lines = [("model-b (steady) latency, created -> visible to a read_committed reader, ms; model-a (flooded) "
              "draining its backlog meanwhile"), "",
             ("| phase | model-b req | p50 | p95 | p99 | max | fetch / process / visible p50, p99 | model-a req/s | "
              "model-a left at end | cores: worker a / worker b / broker / machine | load 1m |"),
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for p in report["phases"]:
        c = p["cores"]
        cores = " / ".join(f"{c[k]:.2f}" if k in c else "-" for k in ("model-a", "model-b", "broker", "machine"))
        a = (f"{p['a_per_s_in_window']:.0f} | {p['a_left_at_stream_end']}" if p["kind"] == "flooded" else "- | -")
        sg = p["segments_ms"]
        segs = ", ".join(" / ".join(f"{sg[k][q]:.0f}" for k in ("fetch", "process", "visible")) for q in ("p50", "p99"))
        lines.append(f"| {p['phase']} | {p['b_answered']}/{p['b_requests']}{'' if p['complete'] else ' (incomplete)'} | "
                     f"{p['p50_ms']:.0f} | {p['p95_ms']:.0f} | {p['p99_ms']:.0f} | {p['max_ms']:.0f} | {segs} | {a} | {cores} | "
                     f"{p['loadavg_1m']:.1f} |")
    lines.append("")
    for r in report["ratios"]:
        lines.append(f"{r['phase']}: p99 {r['flooded_p99_ms']:.0f} ms / alone "
                     f"{r['alone_ref_ms']:.0f} ms (mean of {', '.join(f'{x:.0f}' for x in r['alone_p99_ms'])}) = "
                     f"{r['ratio']:.2f}x: {'within' if r['within_goal'] else 'NOT within'} {GOAL}x")
    if report["deadletters"]:
        lines.append("dead letters: " + ", ".join(f"{n} {k}" for k, n in report["deadletters"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sleep-ms", type=float, default=50.0,
                    help="the stand-in device's time per batch (a worker tops out at 32 per that)")
    ap.add_argument("--rate", type=float, default=100.0, help="model-b's stream, req/s (Poisson)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of model-b's stream per phase")
    ap.add_argument("--backlog", type=int, default=20000,
                    help="model-a's requests per flooded phase (20000 at 640 req/s: ~31 s, longer than a phase)")
    ap.add_argument("--rounds", type=int, default=2, help="flooded phases, each followed by an alone one")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of both models' traffic first")
    ap.add_argument("--seed", type=int, default=1, help="of the Poisson stream (the same in every phase)")
    ap.add_argument("--partitions", type=int, default=6, help="per request topic")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 5 s phases, a 4000-request backlog, 1 round, 3 s warm-up")
    ap.add_argument("--out", default="isolation", help="name of the saved .json and .png")
    ap.add_argument("--bootstrap-servers", "--bootstrap", dest="bootstrap_servers")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.backlog, args.rounds, args.warmup = 5.0, 4000, 1, 3.0
    texts = sample_texts(1024)
    times = poisson(args.rate, args.duration, args.seed)
    ceiling = 32 * 1000 / args.sleep_ms
    report = {"machine": machine_facts(sys.argv if argv is None else ["bench/isolation_bench.py", *argv]),
              "sleep_ms": args.sleep_ms, "worker_ceiling_per_s": ceiling, "rate": args.rate,
              "duration_s": args.duration, "backlog": args.backlog, "rounds": args.rounds, "seed": args.seed,
              "partitions": args.partitions, "goal": GOAL, "phases": []}
    print(f"model-b: {len(times)} requests per phase ({args.rate:g}/s Poisson, {args.rate / ceiling:.0%} of one "
          f"worker's {ceiling:.0f}/s); model-a: {args.backlog} per flood (~{args.backlog / ceiling:.0f} s of "
          "its worker)", flush=True)
    with broker(args.bootstrap_servers) as base:
        s = fresh_settings(base, "isolation", args.partitions)
        served = {m: s.with_overrides(model_name=m) for m in MODELS}
        for ms in served.values():
            ensure_topics(ms, partitions=args.partitions)
        codec = Codec.from_settings(s)
        # a reader per model, of its own results topic, as the gateway reads them: one reader of
        # both queued model-b's results behind model-a's flood in its fetches
        meters = {m: KeyedMeter(ms, ms.model_results_topic) for m, ms in served.items()}
        procs: dict = {}
        prod = None
        try:
            for m, ms in served.items():
                print(f"starting {m}'s worker (group {ms.worker_group}, topics {', '.join(ms.request_topics)}) ...",
                      flush=True)
                procs[m] = spawn("inferlog", ms, "--sleep-ms", str(args.sleep_ms))
            for m, ms in served.items():
                wait_group(ms, ms.worker_group, 1)
            broker_pid = listener_pid(int(s.bootstrap_servers.split(",")[0].rsplit(":", 1)[1]))
            # one producer, up before the timing (its first requests connect and read the registry)
            prod = Producer(s)
            ctx = {"s": s, "meters": meters, "codec": codec, "prod": prod, "enc": RequestEncoder(s), "texts": texts,
                   "times": times, "cores": Cores(procs, broker_pid)}
            print(f"warm-up: {args.warmup:g} s of model-b's stream and a {len(texts)}-request blast on model-a ...",
                  flush=True)
            marks = {m: len(mt.keys) for m, mt in meters.items()}
            warm_a = [ctx["enc"].envelope("embed", t, model=MODELS[0], metadata={"source": "bench"}) for t in texts]
            send_all(s, warm_a)
            warm_b = stream(prod, texts, poisson(args.rate, args.warmup, args.seed + 1), MODELS[1])
            if not (meters[MODELS[0]].wait_ids({e.request_id.encode() for e in warm_a}, marks[MODELS[0]], 120)
                    and meters[MODELS[1]].wait_ids({i.encode() for i in warm_b}, marks[MODELS[1]], 120)):
                raise RuntimeError("the warm-up's results did not all come back in 120 s")
            kinds = ["alone"] + ["flooded", "alone"] * args.rounds
            count: dict[str, int] = {}
            for kind in kinds:
                count[kind] = count.get(kind, 0) + 1
                print(f"{kind} {count[kind]} ...", flush=True)
                p = phase(kind, count[kind], ctx, args)
                report["phases"].append(p)
                print(f"    model-b p50 {p['p50_ms']:.0f} p95 {p['p95_ms']:.0f} p99 {p['p99_ms']:.0f} max {p['max_ms']:.0f} ms"
                      + ("" if p["complete"] else f" INCOMPLETE {p['b_answered']}/{p['b_requests']}")
                      + (f"; model-a {p['a_per_s_in_window']:.0f} req/s, {p['a_left_at_stream_end']} left at the end"
                         + ("" if p["a_drained"] else " (NOT drained)") if kind == "flooded" else "")
                      + (f"; WRONG model names {p['wrong_model_name']}" if p["wrong_model_name"] else ""), flush=True)
                if kind == "flooded" and p["a_left_at_stream_end"] <= 0:
                    print("    note: model-a's backlog ran out before model-b's stream ended: raise --backlog", flush=True)
            report["deadletters"] = deadletters(s, codec)
        finally:
            if prod is not None:
                prod.close()
            for p in procs.values():
                stop(p)
            for mt in meters.values():
                mt.close()
    report["ratios"] = ratios(report["phases"])
    save(report, f"{args.out}.json")
    plot_bars(RESULTS / f"{args.out}.png", "model-b's p99 while model-a is alone / flooded",
              [p["phase"] for p in report["phases"]], [p["p99_ms"] for p in report["phases"]], "p99 ms",
              note=f"sleep runner {args.sleep_ms:g} ms/batch per model, model-b {args.rate:g} req/s Poisson, "
                   f"model-a backlog {args.backlog}; {report['machine']['cpu_count']} CPUs")
    print("\n" + table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

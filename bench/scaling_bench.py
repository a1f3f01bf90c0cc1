"""Scaling as users scale out: worker processes join a serving group one by one under steady traffic.

    .venv/bin/python bench/scaling_bench.py [--runner sleep,model] [--workers 4] [--sleep-ms 50]

An open-loop offer runs from before the first worker to the end, at a fixed rate above what the
largest group can take, so every worker always has a backlog and what it commits per second is
its capacity. One worker process starts (bench/contenders.py inferlog, its own worker id); one
more joins at each step up to --workers; then the last one leaves (SIGTERM: it finishes what it
holds, commits and leaves the group). Each step is measured over a --window that starts
--settle seconds after the group is balanced (every member holds an even share of each request
topic, as the broker reports it): committed results per second, per worker id (the results'
`worker_id`) and per tier (their source topic), from a read_committed reader; and the CPU the
workers, the broker and the whole machine used meanwhile.

Runners (each a scenario of its own, on fresh topics):
- sleep: bench/echo_runner.SleepRunner, whose run() sleeps --sleep-ms per batch and costs no
  CPU, as a small model's forward on a GPU. One worker tops out at max_batch_size / sleep
  (32 / 50 ms = 640 req/s, the "ceiling"); the goal is N workers at N times one (4 >= 3.5x).
- shared: one device for all the workers (bench/echo_runner.SharedDeviceRunner: batches from
  every process take turns on one lock, as on one GPU), --shared-ms per batch (2: 16,000 req/s,
  more than one process's Python can feed). Processes join up to --shared-workers: does a second
  process on the same device add what one process's GIL leaves unfed (issue 17)? shared-inline:
  the same with every stage of each worker on its loop thread (stages=inline).
- model: the default all-MiniLM-L6-v2 on the CPU, --model-workers (2) joining at --model-rate:
  on a 2-core machine the second worker only splits the same cores.

Traffic mix: --high-share (0.75) of the requests go to the high tier. A worker serves up to
high_priority_weight (4) high batches per normal one, so with 3 in 4 high both tiers keep a
backlog at every step and every batch is full. With fewer high requests the high tier keeps up
once there are two workers and its batches are partial, and a fixed time per batch then measures
the batching policy's latency-first choice rather than scaling (BENCHMARKS.md shows both).

max_in_flight (records per tier between fetch and commit) is sized to ~3 s of one worker's work
(--max-in-flight 2048, --model-max-in-flight 512), not the default 8192 (tuned for the echo model
at ~7,000 rec/s): with 8192 a stopping worker drains ~25 s of sleep-runner work and minutes of
the CPU model's, and results wait as long for their partition's earlier records to commit.

The offer cycles through a pool of requests encoded beforehand (request ids repeat across
cycles; nothing in the worker deduplicates by id): encoding each on the fly (~100 µs here)
would take more of the shared cores than the workers' own work. Results are decoded after the
run for the same reason. 12 partitions per topic: an even share for 1, 2, 3 and 4 workers. The
first window waits for --warmup s of traffic: a fresh broker spends ~1 core on a new stream's
first ~20 s here, which would hold down the baseline all ratios are taken against.
Saves bench/results/scaling.json and scaling.png.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from confluent_kafka import Producer as KafkaProducer
from confluent_kafka.admin import AdminClient

from report import scaling_table
from harness import RESULTS, ResultMeter, _epoch_ms, broker, fresh_settings, machine_facts, save, spawn, stop

from inferlog.clients import confluent_config
from inferlog.codec import RESULT, Codec
from inferlog.consumer.demo import sample_texts
from inferlog.producer.sync import RequestEncoder

CLK = os.sysconf("SC_CLK_TCK")


class Offer(threading.Thread):
    """Open loop: `rate` requests/s on a fixed schedule whatever the workers take, `high_share`
    of them to the high tier, spread over the partitions by their random keys."""

    def __init__(self, s, rate: float, high_share: float, pool: int = 4096):
        super().__init__(name="bench-offer", daemon=True)
        enc, texts = RequestEncoder(s), sample_texts(pool)
        # request i is high when it carries the running share over an integer: an exact mix
        self.pool = [enc.envelope("embed", t, metadata={"source": "bench"},
                                  priority=s.high_priority if int((i + 1) * high_share) > int(i * high_share) else 0)
                     for i, t in enumerate(texts)]
        self.p = KafkaProducer(confluent_config(s, **{"linger.ms": 5, "compression.type": "lz4",
                                                      "partitioner": "murmur2_random"}))
        self.rate, self.sent, self.t0 = rate, 0, None
        self._halt = threading.Event()

    def run(self):
        self.t0 = time.monotonic()
        while not self._halt.wait(0.01):  # 10 ms ticks: what is due is sent at once
            due = int((time.monotonic() - self.t0) * self.rate)
            while self.sent < due:
                e = self.pool[self.sent % len(self.pool)]
                try:
                    self.p.produce(e.topic, e.value, e.key, headers=e.headers)
                    self.sent += 1
                except BufferError:
                    self.p.poll(0.01)
            self.p.poll(0)

    def stop(self) -> float:
        """Stops; returns the rate it kept."""
        self._halt.set()
        self.join(5)
        self.p.flush(30)
        return self.sent / (time.monotonic() - self.t0) if self.t0 else 0.0


def balanced(admin, s, members: int) -> dict | None:
    """{worker id: {tier: [partitions]}} once the group is Stable with `members` members that hold
    every partition, each tier spread evenly (max - min <= 1) as the broker reports it; else None."""
    try:
        d = admin.describe_consumer_groups([s.worker_group])[s.worker_group].result(10)
    except Exception:  # the group does not exist until its first member joins
        return None
    if len(d.members) != members or not str(d.state).upper().endswith("STABLE"):
        return None
    held = {}
    for m in d.members:  # the worker's client.id is inferlog-<worker id>
        tiers = held.setdefault(m.client_id.removeprefix("inferlog-"), {"high": [], "normal": []})
        for tp in m.assignment.topic_partitions if m.assignment else ():
            tiers[s.tier_of(tp.topic)].append(tp.partition)
    for tier in ("high", "normal"):
        counts = [len(h[tier]) for h in held.values()]
        if sum(counts) != s.partitions or max(counts) - min(counts) > 1:
            return None
    return {w: {t: sorted(ps) for t, ps in h.items()} for w, h in sorted(held.items())}


def wait_balanced(admin, s, members: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (held := balanced(admin, s, members)) is not None:
            return held
        time.sleep(0.2)
    raise TimeoutError(f"group {s.worker_group} not balanced over {members} members in {timeout}s")


def moves(before: dict, after: dict) -> tuple[int, int]:
    """Partitions that changed owner, and how many of them went from one member that stays to
    another that was there before: work dropped (and redone) beyond what the change needed."""
    def owners(held):
        return {(t, p): w for w, h in held.items() for t, ps in h.items() for p in ps}
    a, b = owners(before), owners(after)
    moved = [tp for tp in b if a.get(tp) != b[tp]]
    return len(moved), sum(1 for tp in moved if a.get(tp) in after and b[tp] in before)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def listener_pid(port: int) -> int | None:
    """The process listening on a local TCP port (the broker's JVM), from /proc; None if unseen."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).readlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:  # gone, or not ours to read
            continue
    return None


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy so far, whoever's: how much of the machine others took."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / CLK  # all but idle and iowait


def scenario(base, key: str, name: str, extra: list[str], counts: list[int], rate: float, max_in_flight: int,
             args, capacity: float | None = None, device_ms: float | None = None, **overrides) -> dict:
    """One run: the offer starts, then the group goes through `counts` workers, one process joining
    or leaving (the last to join) per step."""
    s = fresh_settings(base, f"scale-{key}", args.partitions, max_in_flight=max_in_flight, **overrides)
    # decoded after the run; counted by completion, so arrival stamps need no precision and the
    # broker is spared a fetch every 10 ms
    meter = ResultMeter(s, s.model_results_topic, keep=True, fetch_wait_ms=250)
    admin = AdminClient(confluent_config(s))
    print(f"[{name}] encoding the offer's pool ...", flush=True)
    offer = Offer(s, rate, args.high_share)
    procs: dict[str, object] = {}
    steps, events = [], []
    broker_pid = listener_pid(int(s.bootstrap_servers.split(",")[0].rsplit(":", 1)[1]))  # local brokers only
    offer.start()  # steady traffic from before the first worker: it joins with a backlog waiting
    try:
        for n in counts:
            t0 = time.time()
            if n > len(procs):  # one more joins
                label = f"w{n}"
                procs[label] = spawn("inferlog", s, *extra, env={"INFERLOG_WORKER_ID": label})
                what, t0 = f"{label} joins", time.time()  # from READY: model load is not the group's
            else:  # the last one leaves: SIGTERM, it drains what it holds and leaves the group
                label = next(reversed(procs))
                what = f"{label} leaves"
                stop(procs.pop(label), timeout=120)
            events.append({"t": t0, "what": what, "exited": time.time()})
            print(f"[{name}] {what}; {n} worker{'s' if n > 1 else ''} ...", flush=True)
            held = wait_balanced(admin, s, n)
            settled = time.time()
            moved, needless = moves(steps[-1]["held"], held) if steps else (0, 0)
            time.sleep(args.settle)
            if not steps:  # a broker's first ~20 s of a new stream cost it ~1 core here (JIT, new logs)
                time.sleep(max(0.0, offer.t0 + args.warmup - time.monotonic()))
            cpu0, busy0, own0 = {w: cpu_s(p.pid) for w, p in procs.items()}, machine_busy_s(), time.process_time()
            broker0 = cpu_s(broker_pid) if broker_pid else 0.0
            w0 = time.time()
            time.sleep(args.window)
            w1 = time.time()
            cpu = {w: cpu_s(p.pid) - cpu0[w] for w, p in procs.items()}
            machine, own = (machine_busy_s() - busy0) / (w1 - w0), (time.process_time() - own0) / (w1 - w0)
            broker_cores = (cpu_s(broker_pid) - broker0) / (w1 - w0) if broker_pid else None
            steps.append({"workers": n, "event": what, "start": t0, "rebalance_s": settled - t0,
                          "drain_s": events[-1]["exited"] - t0 if "leaves" in what else None,
                          "window": [w0, w1], "held": held, "moved": moved, "moved_between_stayers": needless,
                          "worker_cpu_s": cpu, "bench_cores": own, "broker_cores": broker_cores,
                          "machine_cores": machine, "loadavg_1m": os.getloadavg()[0]})
            print(f"    balanced after {settled - t0:.1f} s, {moved} partitions moved ({needless} between members "
                  f"that stay): {held}", flush=True)
    finally:  # the workers first, all at once (each drains what it holds): none may outlive the run
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            stop(p, timeout=120)  # what they finished in the last window is committed on the way out
        offered = offer.stop()
        meter.close()
    return {"name": name, "rate": rate, "offered_per_s": offered, "high_share": args.high_share,
            "max_in_flight": max_in_flight,
            "events": events, "shared_device_ms": device_ms,
            ("capacity" if device_ms else "capacity_per_worker"): capacity, **count(s, meter, steps, capacity, device_ms)}


def count(s, meter, steps: list[dict], capacity: float | None, device_ms: float | None = None) -> dict:
    """Each step's window: committed results per second per worker id and per tier, mean batch.

    A result counts in the window in which its worker finished it (`completed_at`; the workers run
    on this machine's clock), once a read_committed reader has seen it. Its arrival at the reader is
    later and lumpy: a worker commits a partition's results only up to the first record not yet
    done, and batches are cut by length across the whole in-flight queue, so a result can wait
    there for seconds (visible_per_s, kept in the JSON, counts by arrival). Every source offset must
    be answered once: exactly-once across the rebalances."""
    codec = Codec.from_settings(s)
    rows = []  # (completed ms, worker id, tier, batch size, arrival ms, batch id, model ms)
    sources = set()
    for at, v in zip(meter.arrivals, meter.values):
        r = codec.decode(v, expect=RESULT)
        src = r["source"]
        sources.add((src["topic"], src["partition"], src["offset"]))
        rows.append((_epoch_ms(r["timings"]["completed_at"]), r["worker_id"], s.tier_of(src["topic"]), r["batch"]["size"],
                     at, r["batch"]["batch_id"], r["timings"]["infer_ms"]))
    for st in steps:
        a, b = (t * 1000 for t in st["window"])
        sel = [r for r in rows if a <= r[0] < b]
        secs = (b - a) / 1000
        st["per_s"] = len(sel) / secs
        st["visible_per_s"] = sum(a <= r[4] < b for r in rows) / secs
        st["per_worker"] = {w: n / secs for w, n in sorted(Counter(r[1] for r in sel).items())}
        st["per_tier"] = {t: n / secs for t, n in sorted(Counter(r[2] for r in sel).items())}
        st["per_worker_tier"] = {f"{w} {t}": n / secs for (w, t), n in sorted(Counter((r[1], r[2]) for r in sel).items())}
        batches = {(r[1], r[5]): (r[3], r[6]) for r in sel}  # (worker, batch id) -> (size, ms in runner.run)
        st["mean_batch"] = sum(b[0] for b in batches.values()) / len(batches) if batches else float("nan")
        # share of the window each worker's device spent in runner.run: below 100% it waited for
        # the CPU (fetch, decode, prepare, commit on the shared cores)
        st["device_busy"] = sum(b[1] for b in batches.values()) / 1000 / secs / st["workers"]
        if device_ms:  # one shared device: runner.run also counts the wait for its turn; its own time is the sleep
            st["device_busy"] = len(batches) * device_ms / 1000 / secs
        st["ms_per_batch"] = sum(b[1] for b in batches.values()) / len(batches) if batches else float("nan")
        st["worker_cores"] = sum(st["worker_cpu_s"].values()) / secs  # cores the workers kept busy
        st["worker_cpu_ms_per_result"] = sum(st["worker_cpu_s"].values()) * 1000 / max(1, len(sel))
    one = steps[0]["per_s"]
    for st in steps:
        st["vs_one"] = st["per_s"] / one if one else float("nan")
        if capacity:  # the sleep runner's ceiling: every batch full, the device never idle
            st["of_ceiling"] = st["per_s"] / (capacity if device_ms else capacity * st["workers"])
    t0 = steps[0]["start"] * 1000
    timeline = Counter((int((r[0] - t0) // 1000), r[1]) for r in rows if r[0] >= t0)  # (second, worker) -> results
    return {"steps": steps, "results": len(rows), "duplicates": len(rows) - len(sources),
            "timeline": [[sec, w, n] for (sec, w), n in sorted(timeline.items())]}


def plot(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = report["scenarios"]
    fig, axes = plt.subplots(len(scen), 2, figsize=(13, 4.2 * len(scen)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]})
    for (ax, bx), sc in zip(axes, scen):
        t0 = sc["steps"][0]["start"]
        workers = sorted({w for _, w, _ in sc["timeline"]})
        # bins that hold several batches per worker, else a slow model's plot is all spikes
        width = 1 if sc["steps"][0]["per_s"] > 200 else 5
        bins = range(0, max(s for s, _, _ in sc["timeline"]) + 1, width)
        per = {w: Counter() for w in workers}
        for sec, w, n in sc["timeline"]:
            per[w][sec - sec % width] += n / width
        ax.stackplot(list(bins), *[[per[w][x] for x in bins] for w in workers], labels=workers, alpha=0.8, step="post")
        for st in sc["steps"]:
            a, b = st["window"]
            ax.axvspan(a - t0, b - t0, color="0.85", zorder=0)
            ax.axvline(st["start"] - t0, color="0.3", lw=0.8, ls="--")
            ax.text(st["start"] - t0, 0.98, " " + st["event"], fontsize=7, va="top", transform=ax.get_xaxis_transform())
        ax.set_xlabel("seconds since the first worker was ready (grey: measured windows)")
        ax.set_ylabel("committed results / s by completion, per worker")
        ax.set_title(f"{sc['name']}: offered {sc['offered_per_s']:.0f} req/s ({sc['high_share']:.0%} high tier)")
        ax.legend(fontsize=7, loc="lower left", framealpha=0.9)
        labels = [f"{st['workers']}w" + (" (after leave)" if "leaves" in st["event"] else "") for st in sc["steps"]]
        one = sc["steps"][0]["per_s"]
        bars = bx.bar(labels, [st["per_s"] for st in sc["steps"]], color=[f"C{i}" for i in range(len(labels))])
        bx.bar_label(bars, labels=[f"{st['vs_one']:.2f}x" for st in sc["steps"]], fontsize=8)
        bx.plot(labels, [one * st["workers"] for st in sc["steps"]], "k:", marker="_", ms=20, label="N x one worker")
        if sc.get("capacity"):  # one shared device: its ceiling does not grow with the workers
            bx.axhline(sc["capacity"], color="r", ls="--", lw=0.8, label="the shared device's ceiling")
        if sc.get("capacity_per_worker"):
            bx.plot(labels, [sc["capacity_per_worker"] * st["workers"] for st in sc["steps"]], "r--", lw=0.8,
                    label="N x ceiling (full batches, device never idle)")
        bx.set_ylabel("committed results / s in the window")
        bx.set_title("throughput per step")
        bx.legend(fontsize=7, loc="upper left")
        plt.setp(bx.get_xticklabels(), rotation=15, ha="right", fontsize=8)
    m = report["machine"]
    fig.text(0.01, 0.005, f"{m['date']}, {m['cpu_count']} CPUs shared with the broker, load 1m at start "
             f"{m['loadavg_start'][0]:.1f}", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runner", default="sleep,model",
                    help="comma-separated scenarios: sleep, model, shared, shared-inline")
    ap.add_argument("--workers", type=int, default=4, help="sleep runner: workers at the top step")
    ap.add_argument("--sleep-ms", type=float, default=50.0, help="sleep runner: device time per batch")
    ap.add_argument("--rate", type=float, help="sleep runner: offered req/s (default 1.25x --workers' capacity)")
    ap.add_argument("--max-in-flight", type=int, default=2048,
                    help="sleep runner: the workers' max_in_flight (records per tier; ~3 s of one worker's work)")
    ap.add_argument("--shared-ms", type=float, default=2.0,
                    help="shared: device time per batch of the one device all workers share (2 ms: 16,000 req/s, "
                         "about all-MiniLM-L6-v2 on a V100)")
    ap.add_argument("--shared-workers", type=int, default=3, help="shared: processes at the top step")
    ap.add_argument("--shared-rate", type=float, default=12000.0,
                    help="shared: offered req/s (twice what one process drains here, within the device's capacity)")
    ap.add_argument("--model-workers", type=int, default=2)
    ap.add_argument("--model-max-in-flight", type=int, default=512, help="model runner: ~3 s of its work here")
    ap.add_argument("--model-rate", type=float, default=300.0, help="model runner: offered req/s")
    ap.add_argument("--high-share", type=float, default=0.75, help="share of requests on the high tier")
    ap.add_argument("--partitions", type=int, default=12, help="per request topic")
    ap.add_argument("--window", type=float, default=20.0, help="seconds measured per step")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds between a balanced group and its window")
    ap.add_argument("--warmup", type=float, default=30.0, help="least seconds of traffic before the first window")
    ap.add_argument("--out", default="scaling")
    ap.add_argument("--bootstrap-servers")
    args = ap.parse_args(argv)
    # a SIGTERM (a stray pkill, a CI timeout) unwinds through the finally blocks: no worker or
    # broker is left behind retrying against a broker that is gone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with broker(args.bootstrap_servers) as base:
        report = {"machine": machine_facts(sys.argv), "partitions": args.partitions, "window_s": args.window,
                  "settle_s": args.settle, "warmup_s": args.warmup, "max_batch_size": base.max_batch_size,
                  "max_wait_ms": base.max_wait_ms, "scenarios": []}
        for name in args.runner.split(","):
            if name == "sleep":
                capacity = base.max_batch_size * 1000 / args.sleep_ms  # one worker, every batch full
                sc = scenario(base, name, f"sleep {args.sleep_ms:g} ms/batch", ["--sleep-ms", str(args.sleep_ms)],
                              [*range(1, args.workers + 1), args.workers - 1], args.rate or 1.25 * args.workers * capacity,
                              args.max_in_flight, args, capacity)
            elif name in ("shared", "shared-inline"):  # one device the processes take turns on: joins only
                lock = Path(tempfile.mkdtemp(prefix="bench-shared-device-")) / "device.lock"
                capacity = base.max_batch_size * 1000 / args.shared_ms  # the device's, whoever feeds it
                stages = "inline" if name.endswith("inline") else "threads"
                sc = scenario(base, name, f"one shared device, {args.shared_ms:g} ms/batch, stages {stages}",
                              ["--sleep-ms", str(args.shared_ms), "--shared-device", str(lock)],
                              list(range(1, args.shared_workers + 1)), args.shared_rate,
                              args.max_in_flight, args, capacity, device_ms=args.shared_ms, stages=stages)
            elif name == "model":  # joins only: brief, it shows one thing
                sc = scenario(base, name, "all-MiniLM-L6-v2 on CPU", [], list(range(1, args.model_workers + 1)),
                              args.model_rate, args.model_max_in_flight, args)
            else:
                raise SystemExit(f"unknown runner {name!r}")
            report["scenarios"].append(sc)
            print("\n" + scaling_table({"scenarios": [sc]}), flush=True)
    save(report, f"{args.out}.json")
    plot(report, RESULTS / f"{args.out}.png")
    print("\n" + scaling_table(report))
    if any(sc["duplicates"] for sc in report["scenarios"]):
        print("DUPLICATES among the committed results: exactly-once broke", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sharded replay: one run's window spread over N member processes, against one member.

    .venv/bin/python bench/replay_scaling_bench.py [--members 1,2,3,4] [--records 40000]
                                                   [--sleep-ms 50] [--high-share 0.25]

A log of --records requests on both tiers' topics (--partitions each, --high-share of them on
the high tier) is written once. For each member count a new shared run over the whole log
(both topics) is defined (`replay --shared`), and that many member processes join it
(`replay --join RUN`), each with its own worker id and state directory, as pods of the Helm
replay Job would; they split the window through the run's consumer group. Every member serves
bench/echo_runner.SleepRunner, whose run() sleeps --sleep-ms per batch and costs no CPU, as a
small model on a GPU: one member tops out at max_batch_size / sleep (32 / 50 ms = 640 req/s).
On 2 shared cores a CPU model can only split the same cores.

Throughput is the results the run committed over the span from its first committed result to
its last, read back from the output topic (read_committed; a result's timestamp is its
produce time, just before its transaction commits): member start-up (Python, torch import) is
outside it, joining and rebalancing while results flow are inside it. "All serving" is the
rate from the last member's first result to the first member's last one: the run's pace once
every member has joined (on 2 cores the members' start-up is staggered by seconds, as it would
not be on separate hosts) and before the tail where only the slowest partitions are left.
`wall` is from spawning the members to the last one's exit. The check: every window offset answered exactly once,
per member counts from the results' worker ids.
Saves bench/results/replay_scaling.json and replay_scaling.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from report import replay_scaling_table
from harness import RESULTS, broker, fresh_settings, machine_facts, plot_bars, save, send_all

from inferlog.clients import confluent_config
from inferlog.codec import RESULT, Codec
from inferlog.consumer.demo import sample_texts
from inferlog.producer.sync import RequestEncoder
from inferlog.settings import load_settings

MEMBER_FIELDS = ("bootstrap_servers", "requests_topic", "high_priority_topic", "results_topic", "deadletter_topic",
                 "replays_topic", "max_batch_size", "max_wait_ms", "max_in_flight", "partitions", "group_protocol")


def write_log(s, n: int, high_share: float) -> float:
    """n requests, as fast as the client goes; an exact share of them high. Returns seconds."""
    enc, texts = RequestEncoder(s), sample_texts(4096)
    return send_all(s, [enc.envelope("embed", texts[i % len(texts)], metadata={"source": "bench"},
                                     priority=s.high_priority if int((i + 1) * high_share) > int(i * high_share) else 0)
                        for i in range(n)])


def read_output(s, topic: str, codec: Codec) -> tuple[list[dict], list[float]]:
    """Every committed result on `topic` (read_committed) and its timestamp (epoch s)."""
    c = Consumer(confluent_config(s, **{"group.id": f"{topic}.reader", "isolation.level": "read_committed",
                                        "enable.auto.commit": False}))
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        tps = [TopicPartition(topic, p) for p in md.partitions]
        ends = {tp.partition: c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        left = {p for p, e in ends.items() if e > 0}
        rows, stamps = [], []
        deadline = time.monotonic() + 120
        while left and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if not m.error():
                    rows.append(codec.decode(m.value(), expect=RESULT))
                    stamps.append(m.timestamp()[1] / 1000)
            # a partition's last offsets are transaction markers, never delivered: the position says
            left -= {tp.partition for tp in c.position([TopicPartition(topic, p) for p in left])
                     if tp.offset >= ends[tp.partition]}
        return rows, stamps
    finally:
        c.close()


def run_members(base, s, n: int, sleep_ms: float, tmp: Path) -> dict:
    """Define a shared run over the whole log, let n members do it; the figures of the run."""
    from echo_runner import SleepRunner

    from inferlog.replay import runner as rr
    from inferlog.replay.window import resolve_window

    window = resolve_window(s, list(s.request_topics))
    out = f"{s.requests_topic}-replay{n}"
    output = rr.output_spec(None, out, None)
    run = rr.start(s, window, output, runner=SleepRunner(sleep_ms), state_dir=tmp / f"define{n}", shared=True,
                   join=False).run_id
    conf = json.dumps({k: getattr(s, k) for k in MEMBER_FIELDS})
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, __file__, "member", "--settings", conf, "--run-id", run,
                               "--member", f"m{i}", "--sleep-ms", str(sleep_ms), "--state-dir", str(tmp / f"{run}-m{i}")],
                              stdout=subprocess.PIPE, text=True)
             for i in range(n)]
    summaries = []
    for p in procs:
        line = p.communicate(timeout=1800)[0].strip().splitlines()
        if p.returncode != 0 or not line:
            raise RuntimeError(f"a member exited {p.returncode}")
        summaries.append(json.loads(line[-1]))
    wall = time.monotonic() - t0
    rows, stamps = read_output(s, out, Codec.from_settings(s))
    offsets = Counter((r["source"]["topic"], r["source"]["partition"], r["source"]["offset"]) for r in rows)
    span = max(stamps) - min(stamps) if stamps else float("nan")
    # while every member serves: from the last member's first result to the first member's last
    first, last = {}, {}
    for r, t in zip(rows, stamps):
        m = r["worker_id"].rsplit("-", 1)[-1]
        first[m], last[m] = min(first.get(m, t), t), max(last.get(m, t), t)
    lo, hi = max(first.values()), min(last.values())
    together = sum(lo <= t <= hi for t in stamps) / (hi - lo) if hi - lo > 1 else float("nan")
    t0s = min(stamps)
    timeline = Counter(int(t - t0s) for t in stamps)
    return {"members": n, "run_id": run, "window": window.total, "results": len(rows),
            "distinct_offsets": len(offsets), "duplicates": sum(v - 1 for v in offsets.values()),
            "per_s": len(rows) / span, "span_s": span, "wall_s": wall, "together_per_s": together,
            "together_s": hi - lo, "joined_after_s": lo - t0s, "tail_s": max(stamps) - hi,
            "per_second": [timeline.get(i, 0) for i in range(int(span) + 1)], "loadavg_1m": os.getloadavg()[0],
            # a member's worker id is replay-<run>-<member>
            "per_member": dict(sorted(Counter(r["worker_id"].rsplit("-", 1)[-1] for r in rows).items())),
            "per_topic": dict(Counter(r["source"]["topic"] for r in rows)),
            "member_seconds": {m["member"]: m["seconds"] for m in summaries}}


def member(args) -> int:
    """One member process: join the run with the sleep runner; print its summary as JSON."""
    from echo_runner import SleepRunner

    from inferlog.replay import runner as rr

    s = load_settings(**json.loads(args.settings), worker_id=args.member)
    sm = rr.join(s, args.run_id, runner=SleepRunner(args.sleep_ms), state_dir=Path(args.state_dir))
    print(json.dumps({"member": args.member, "status": sm.status, "records": sm.records, "seconds": sm.seconds}))
    return 0 if sm.status == "done" else 1


def main(argv: list[str] | None = None) -> int:
    if (argv or sys.argv[1:])[:1] == ["member"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        for flag in ("--settings", "--run-id", "--member", "--state-dir"):
            ap.add_argument(flag, required=True)
        ap.add_argument("--sleep-ms", type=float, required=True)
        return member(ap.parse_args(argv))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", default="1,2,3,4", help="member counts, one run each")
    ap.add_argument("--records", type=int, default=40000, help="requests in the log (both tiers)")
    ap.add_argument("--sleep-ms", type=float, default=50.0, help="device time per batch")
    ap.add_argument("--high-share", type=float, default=0.25, help="share of the log on the high tier")
    ap.add_argument("--partitions", type=int, default=12, help="per request topic: an even share for 1-4")
    ap.add_argument("--max-in-flight", type=int, default=2048, help="records per member between fetch and commit")
    ap.add_argument("--out", default="replay_scaling")
    ap.add_argument("--bootstrap-servers")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="inferlog-replay-scaling-"))
    try:
        with broker(args.bootstrap_servers) as base:
            s = fresh_settings(base, "replayscale", partitions=args.partitions, max_in_flight=args.max_in_flight,
                               replays_topic=f"bench.replays.{os.getpid()}")
            print(f"writing {args.records} requests ...", flush=True)
            wrote = write_log(s, args.records, args.high_share)
            report = {"machine": machine_facts(sys.argv), "records": args.records, "write_s": wrote,
                      "sleep_ms": args.sleep_ms, "max_batch_size": s.max_batch_size,
                      "ceiling": s.max_batch_size * 1000 / args.sleep_ms, "partitions": args.partitions,
                      "high_topic": s.tier_topic("high"), "normal_topic": s.tier_topic("normal"), "runs": []}
            for n in map(int, args.members.split(",")):
                print(f"{n} member(s) ...", flush=True)
                report["runs"].append(run_members(base, s, n, args.sleep_ms, tmp))
                print(replay_scaling_table(report), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save(report, f"{args.out}.json")
    runs = report["runs"]
    plot_bars(RESULTS / f"{args.out}.png", f"sharded replay, sleep runner {args.sleep_ms:g} ms/batch",
              [f"{r['members']} member{'s' * (r['members'] > 1)}" for r in runs], [r["per_s"] for r in runs],
              "results/s", note=f"{args.records} records, {args.partitions} partitions per tier")
    print("\n" + replay_scaling_table(report))
    bad = [r for r in runs if r["duplicates"] or r["distinct_offsets"] != r["window"]]
    if bad:
        print(f"the window was not answered exactly once in {len(bad)} run(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

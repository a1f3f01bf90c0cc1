"""A shared replay run against the real broker, its members in processes of their own (as on
hosts or pods), each with its own state directory: they split one run's window through its
consumer group, one killed mid-run is made good by the others and by its own --resume, and
the union of their results is the window of both tiers exactly once, with one run id and one
drift report."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
from click.testing import CliRunner
from confluent_kafka import KafkaException

from conftest import unique
from inferlog.cli import cli
from inferlog.codec import RESULT, Codec
from inferlog.producer.sync import Producer
from inferlog.replay import drift, runner as rr
from inferlog.replay.window import resolve_window
from inferlog.settings import load_settings
from inferlog.topics import ensure_topics
from support import read_all, wait_until

N = 48  # a third on the high tier


@pytest.fixture
def requests_log(kafka):
    tag = unique("shared")
    s = load_settings(bootstrap_servers=kafka.bootstrap, requests_topic=f"{tag}.requests",
                      high_priority_topic=f"{tag}.requests.high", results_topic=f"{tag}.results",
                      deadletter_topic=f"{tag}.deadletter", replays_topic=f"{tag}.replays", partitions=3)
    ensure_topics(s)
    with Producer(s) as p:
        ids = [p.submit("embed", f"request {i}: the parcel arrived late", priority=5 * (i % 3 == 0)) for i in range(N)]
        p.flush()
    return s, ids


def env_of(s, tmp_path, member: str, **extra) -> dict:
    """A member's environment: its own worker id and state directory (nothing shared on disk);
    a slow device (up to 2 s a batch of 2) so that the run outlasts the members' start-up."""
    return {**os.environ, "INFERLOG_BOOTSTRAP_SERVERS": s.bootstrap_servers,
            "INFERLOG_REQUESTS_TOPIC": s.requests_topic, "INFERLOG_HIGH_PRIORITY_TOPIC": s.high_priority_topic,
            "INFERLOG_RESULTS_TOPIC": s.results_topic, "INFERLOG_REPLAYS_TOPIC": s.replays_topic,
            "INFERLOG_REPLAY_DIR": str(tmp_path / member), "INFERLOG_WORKER_ID": member, "INFERLOG_DEVICE": "cpu",
            "INFERLOG_MAX_BATCH_SIZE": "2", "INFERLOG_CPU_WORKERS": "1", "OMP_NUM_THREADS": "1",
            "INFERLOG_FAULT_SLOW_MS": "2000", "INFERLOG_FAULT_SLOW_RATE": "1", **extra}


def replay(env: dict, *args: str, log=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inferlog.cli", "replay", *args], env=env,
                            stderr=log or subprocess.PIPE, text=True)


def results(s, topic: str) -> list[dict]:
    codec = Codec.from_settings(s)
    return [codec.decode(r.value, expect=RESULT) for r in read_all(s, topic)]


def by_member(s, topic: str, run_id: str) -> Counter:
    """Results so far by worker id; none while the topic is still being created."""
    try:
        return Counter(r["worker_id"] for r in results(s, topic) if r["replay_run_id"] == run_id)
    except KafkaException:
        return Counter()


def test_a_file_output_cannot_be_shared(requests_log, tmp_path):
    s, _ = requests_log
    env = env_of(s, tmp_path, "m")
    for args in (["--out", str(tmp_path / "x.jsonl"), "--shared"], ["--join", "r1", "--out", str(tmp_path / "x.jsonl")]):
        res = CliRunner().invoke(cli, ["replay", *args], env=env)
        assert res.exit_code == 1 and "a file output cannot be shared by hosts" in res.stderr, res.output
    res = CliRunner().invoke(cli, ["replay", "--join", "no-such-run"], env=env)
    assert res.exit_code == 1 and f"nor on {s.replays_topic}" in res.stderr, res.output


@pytest.mark.timeout(400)
def test_two_members_one_run_a_killed_member_resumes_the_union_is_the_window_exactly_once(requests_log, tmp_path):
    s, ids = requests_log
    window = resolve_window(s, s.request_topics)
    assert window.total == N
    target, run = unique("replayed"), "shared-1"
    logs = {m: open(tmp_path / f"{m}.log", "w+") for m in ("a", "b", "a2")}
    # the starter snapshots the window and publishes the run; the members join it together
    res = CliRunner().invoke(cli, ["replay", "--to-topic", target, "--run-id", run, "--define-only"],
                             env=env_of(s, tmp_path, "starter"))
    assert res.exit_code == 0 and f"defined on {s.replays_topic}: {N} records" in res.stderr, res.output
    a = replay(env_of(s, tmp_path, "a"), "--join", run, log=logs["a"])
    b = replay(env_of(s, tmp_path, "b"), "--join", run, log=logs["b"])
    procs = [a, b]
    try:
        wait_until(lambda: min(by_member(s, target, run)[f"replay-{run}-{m}"] for m in "ab") >= 1, timeout=200,
                   every=1.0, what="results of both members")
        a.send_signal(signal.SIGKILL)  # mid-run: b takes its partitions over; its restart fences it
        a.wait(10)
        # a restart of a on a host without its state: --resume finds the run on Kafka
        a2 = replay(env_of(s, tmp_path, "a2", INFERLOG_WORKER_ID="a"), "--resume", run, log=logs["a2"])
        procs.append(a2)
        for m, p in (("b", b), ("a2", a2)):
            assert p.wait(200) == 0, open(tmp_path / f"{m}.log").read()[-3000:]
    finally:
        for p in procs:
            p.kill()
    got = [r for r in results(s, target) if r["replay_run_id"] == run]
    positions = Counter((r["source"]["topic"], r["source"]["partition"], r["source"]["offset"]) for r in got)
    assert set(positions) == {(r.topic, r.partition, off) for r in window.ranges for off in range(r.start, r.end)}
    assert max(positions.values()) == 1, "each request of the window exactly once"
    assert Counter(r["request_id"] for r in got) == Counter(ids)
    assert {r["source"]["topic"] for r in got} == set(s.request_topics), "both tiers"
    members = Counter(r["worker_id"] for r in got)
    assert members[f"replay-{run}-a"] > 0 and members[f"replay-{run}-b"] > 0, members
    b_log = open(tmp_path / "b.log").read()  # every member's summary counts the whole run
    assert f"replay {run} done: {N} of {N} records, {N} results, 0 dead letters in all" in b_log, b_log[-2000:]
    assert "this member (b)" in b_log
    # one drift report for the whole run, from any host: every member's results, no live ones
    ck = rr.load_run(s, run, tmp_path / "auditor")
    report = drift.compare_run(s, ck)
    t = report["tasks"]["EMBED"]
    assert (t["compared"], t["missing_original"]) == (0, N), t

"""The worker against the real broker and real models: every offset ends as exactly one
result or dead letter, read back from the real topics with read_committed."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch
from confluent_kafka import Consumer, TopicPartition

from inferlog.clients import confluent_config
from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec
from inferlog.consumer.faults import FaultyRunner
from inferlog.consumer.runners import Row, load_runner
from inferlog.producer.sync import Producer
from inferlog.request import Parameters, build_request, now_ms
from inferlog.settings import default_model_path
from support import Stream, account, output_count, produce_raw, read_all, running_worker, wait_until
from tinymodels import tiny_gpt2_dir  # noqa: F401  (fixture)

TEXTS = [
    "The payment service reported a late refund.",
    "Kafka",
    "An auditor asked which model answered the request about the damaged parcel last Tuesday.",
    "short text",
    "Streaming inference turns every request into exactly one result record.",
]


@pytest.fixture(scope="module")
def embed_runner():
    return load_runner(default_model_path(), device="cpu")


def direct(runner, texts, params=Parameters()):
    rows = [Row(ids, params) for ids in runner.tokenize(texts)]
    prepared = runner.prepare(rows)
    return runner.finish(runner.run(prepared), prepared)


def submit_texts(settings, texts, task="embed", **kw) -> list[str]:
    with Producer(settings) as p:
        ids = [p.submit(task, t, **kw) for t in texts]
    return ids


@pytest.mark.parametrize("batching, stages", [("adaptive", "threads"), ("fixed", "threads"), ("adaptive", "inline")])
def test_embeddings_exactly_once_match_the_model_and_carry_provenance(broker_settings, embed_runner, batching, stages):
    texts = [f"{TEXTS[i % len(TEXTS)]} (#{i})" for i in range(240)]
    ids = submit_texts(broker_settings, texts)
    s = broker_settings.with_overrides(max_batch_size=16, max_wait_ms=5, batching=batching, stages=stages)
    with running_worker(s, embed_runner):
        wait_until(lambda: output_count(s) >= len(ids), what="all results")
    acc = account(s)
    acc.assert_exactly_once()
    assert not acc.dead_letters
    codec = Codec.from_settings(s)
    requests = {codec.decode(r.value, expect=REQUEST)["request_id"]: r for r in acc.requests}
    assert set(requests) == set(ids)
    expected = dict(zip(ids, direct(embed_runner, texts)))
    sizes = set()
    for res in acc.results:
        rid = res["request_id"]
        assert res["status"] == "OK"
        src, req = res["source"], requests[rid]
        assert (src["topic"], src["partition"], src["offset"]) == (s.tier_topic("normal"), req.partition, req.offset)
        got, want = res["outputs"][0]["vector"], expected[rid]["vector"]
        assert len(got) == 384
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
        assert res["model"]["name"] == "all-MiniLM-L6-v2" and res["model"]["digest"]
        assert res["worker_id"] == s.worker_id
        t = res["timings"]
        assert t["created_at"] <= t["consumed_at"] <= t["completed_at"]
        assert 1 <= res["batch"]["size"] <= 16
        sizes.add(res["batch"]["size"])
    assert max(sizes) > 1, "requests were never batched together"


@pytest.mark.parametrize("stages", ["threads", "inline"])
def test_every_kind_of_bad_input_is_a_dead_letter_with_its_reason(broker_settings, embed_runner, stages):
    codec = Codec.from_settings(broker_settings)
    good = build_request("embed", "a perfectly fine request")

    def req(**over):
        rec = build_request("embed", "fine")
        rec.update(over)
        return codec.encode(REQUEST, rec)

    valid = codec.encode(REQUEST, good)
    cases = [  # (value, expected dead-letter reason or result status)
        (b"\x17garbage that is not avro", "UNDECODABLE"),
        (valid[: len(valid) // 2], "UNDECODABLE"),
        (b"\xc3\x01" + b"\x00" * 8 + valid[10:], "UNKNOWN_SCHEMA"),
        (codec.encode(DEADLETTER, {"source": {"topic": "x", "partition": 0, "offset": 1}, "reason": "R",
                                   "detail": "d", "worker_id": "w", "failed_at": 0}), "WRONG_SCHEMA"),
        (None, "UNDECODABLE"),
        (b"", "UNDECODABLE"),
        (req(inputs=[]), "INVALID_REQUEST"),
        (req(inputs=["   "]), "INVALID_REQUEST"),
        (req(parameters={"max_new_tokens": None, "temperature": math.nan, "top_p": None, "seed": None}),
         "INVALID_REQUEST"),
        (req(inputs=["x"] * (broker_settings.max_inputs + 1)), "INPUT_TOO_LARGE"),
        (req(inputs=["word " * 2000]), "INPUT_TOO_LARGE"),
        (req(task="GENERATE"), "UNSUPPORTED_TASK"),
        (req(model="no-such-model"), "UNKNOWN_MODEL"),
        (req(deadline=now_ms() - 1000), "EXPIRED"),
        (req(model="all-MiniLM-L6-v2"), "OK"),
        (valid, "OK"),
    ]
    # interleave good requests so bad ones share partitions and batches with them
    values = []
    for v, _ in cases:
        values += [(b"k", v), (None, req())]
    produce_raw(broker_settings, values)
    with running_worker(broker_settings.with_overrides(stages=stages), embed_runner) as w:
        wait_until(lambda: output_count(broker_settings) >= len(values), what="every offset answered")
        # the worker is still alive and serving
        produce_raw(broker_settings, [(None, req())])
        wait_until(lambda: output_count(broker_settings) >= len(values) + 1, what="the worker to go on")
    acc = account(broker_settings)
    acc.assert_exactly_once()
    by = acc.by_source
    requests = sorted(acc.requests, key=lambda r: (r.partition, r.offset))
    outcome = {}
    for r in requests:
        kind, rec = by[(r.topic, r.partition, r.offset)][0]
        outcome[r.value] = rec["reason"] if kind == "dead" else rec["status"]
        if kind == "dead":
            assert rec["value"] == r.value and rec["detail"]  # the raw bytes travel with the reason
            if rec["reason"] in ("INVALID_REQUEST", "INPUT_TOO_LARGE", "UNSUPPORTED_TASK", "UNKNOWN_MODEL"):
                assert rec["request_id"] and rec["tenant"]  # it decoded: say whose request it was
    for v, want in cases:
        assert outcome[v] == want, f"{v[:20]!r}: {outcome[v]} != {want}"
    assert w.counts["dead_letters"] == sum(1 for _, want in cases if want not in ("OK", "EXPIRED"))


def test_a_model_fault_only_fails_the_faulty_requests(broker_settings, embed_runner):
    texts = [f"request number {i} about {TEXTS[i % 5]}" + (" FAULTY" if i % 13 == 5 else "") for i in range(80)]
    ids = submit_texts(broker_settings, texts)
    faulty = {rid for rid, t in zip(ids, texts) if "FAULTY" in t}
    s = broker_settings.with_overrides(max_batch_size=16, max_wait_ms=50, fault_marker="FAULTY")
    with running_worker(s, FaultyRunner(embed_runner, "FAULTY")):
        wait_until(lambda: output_count(s) >= len(ids), what="all outputs")
    acc = account(s)
    acc.assert_exactly_once()
    assert {d["request_id"] for d in acc.dead_letters} == faulty
    assert set(acc.reasons()) == {"MODEL_ERROR"}
    assert {r["request_id"] for r in acc.results} == set(ids) - faulty
    assert all(r["status"] == "OK" for r in acc.results)


@pytest.mark.parametrize("generation", ["continuous", "static"])
def test_generation_through_the_worker(broker_settings, tiny_gpt2_dir, generation):
    runner = load_runner(str(tiny_gpt2_dir), device="cpu")
    prompts = ["the quick fox", "kafka topics carry records", "a", "the tiny cat sat on the mat"] * 5
    limits = [1 + i % 7 for i in range(len(prompts))]
    with Producer(broker_settings) as p:
        ids = [p.submit("generate", t, parameters={"max_new_tokens": n}) for t, n in zip(prompts, limits)]
    with running_worker(broker_settings.with_overrides(max_batch_size=8, generation=generation), runner):
        wait_until(lambda: output_count(broker_settings) >= len(ids), what="all generations")
    acc = account(broker_settings)
    acc.assert_exactly_once()
    assert not acc.dead_letters
    got = {r["request_id"]: r["outputs"][0] for r in acc.results}
    for rid, prompt, n in zip(ids, prompts, limits):
        out = got[rid]
        assert 1 <= out["tokens"] <= n
        want = direct(runner, [prompt], Parameters(max_new_tokens=n))[0]
        assert out["text"] == want["text"]  # greedy: same answer alone or batched


def test_at_least_once_mode_and_back_pressure(broker_settings, embed_runner):
    ids = submit_texts(broker_settings, [f"text {i}" for i in range(150)])
    s = broker_settings.with_overrides(delivery="at-least-once", max_in_flight=16, max_batch_size=8)
    most, done = [0], threading.Event()

    def watch(w):  # the engine's own count, sampled from another thread while the worker runs
        while not done.wait(0.002):
            most[0] = max(most[0], w.engine.pending_in(s.tier_topic("normal")))

    with running_worker(s, embed_runner) as w:
        watcher = threading.Thread(target=watch, args=(w,), daemon=True)
        watcher.start()
        wait_until(lambda: output_count(s) >= len(ids), what="all results")
        done.set()
        watcher.join()
    assert 0 < most[0] <= 16, f"{most[0]} records in the engine with max_in_flight=16"
    assert w.counts["held"] > 0, "records fetched past max_in_flight must wait outside the engine"
    assert w.counts["pauses"] > 0, "a worker holding max_in_flight more must pause its partitions"
    acc = account(s)
    acc.assert_exactly_once()  # no failures happened, so at-least-once delivered once
    assert {r["request_id"] for r in acc.results} == set(ids)


# -- worker processes: signals, crashes, a second member --------------------------------
def worker_env(s, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "INFERLOG_BOOTSTRAP_SERVERS": s.bootstrap_servers, "INFERLOG_REQUESTS_TOPIC": s.requests_topic,
        "INFERLOG_HIGH_PRIORITY_TOPIC": s.high_priority_topic,
        "INFERLOG_RESULTS_TOPIC": s.results_topic, "INFERLOG_DEADLETTER_TOPIC": s.deadletter_topic,
        "INFERLOG_GROUP_ID": s.group_id, "INFERLOG_MAX_WAIT_MS": "10", "INFERLOG_SESSION_TIMEOUT_MS": "6000",
        "INFERLOG_CPU_WORKERS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


# A backlog several times max_in_flight: records are held past it (and paused past twice it)
# while the tests below stop, kill and add workers, so held records cross every such event.
HOLDING = {"INFERLOG_MAX_IN_FLIGHT": 256}


def start_worker(s, worker_id: str, log_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inferlog.cli", "worker", "--no-create-topics"],
                            env=worker_env(s, INFERLOG_WORKER_ID=worker_id, **HOLDING),
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def held_count(log: str) -> int:
    """The records a worker held back, from the counts it logs when it has drained."""
    return int(re.search(r"drained: .*'held': (\d+)", log).group(1))


def answered_once(s, n: int):
    """Every one of the n requests answered by exactly one result, none dead-lettered."""
    acc = account(s)
    acc.assert_exactly_once()
    assert len(acc.results) == n and not acc.dead_letters
    return acc


def committed(s) -> dict[int, int]:
    c = Consumer(confluent_config(s, **{"group.id": s.worker_group, "enable.auto.commit": False}))
    try:
        tps = c.committed([TopicPartition(s.tier_topic("normal"), p) for p in range(s.partitions)], timeout=30)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def test_sigterm_drains_commits_what_it_consumed_and_exits_0(broker_settings, tmp_path):
    ids = submit_texts(broker_settings, [f"{TEXTS[i % 5]} {i}" for i in range(1500)])
    w = start_worker(broker_settings, "w-term", tmp_path / "w.log")
    try:
        wait_until(lambda: output_count(broker_settings) >= 100, timeout=120, what="the first results")
        w.send_signal(signal.SIGTERM)
        assert w.wait(90) == 0, (tmp_path / "w.log").read_text()[-3000:]
    finally:
        w.kill()
    log = (tmp_path / "w.log").read_text()
    assert "drained" in log
    assert held_count(log) > 0  # it stopped with records held: those are not committed either
    acc = account(broker_settings)
    done = committed(broker_settings)
    by = acc.by_source
    answered = set(by)
    for r in acc.requests:  # below the committed offset: exactly one result; at or above: none
        below = r.offset < done.get(r.partition, -1)
        assert ((r.topic, r.partition, r.offset) in answered) == below, (r.partition, r.offset, done)
    assert all(len(v) == 1 for v in by.values())
    assert 0 < len(acc.results) <= len(ids)


def test_sigkill_restart_and_a_joining_worker_lose_and_duplicate_nothing(broker_settings, tmp_path):
    n = 2000
    submit_texts(broker_settings, [f"{TEXTS[i % 5]} {i}" for i in range(n)])
    a = start_worker(broker_settings, "w-a", tmp_path / "a.log")
    procs = [a]
    try:
        wait_until(lambda: output_count(broker_settings) >= 150, timeout=120, what="the first results")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        # a restarted worker and a new member join while the killed one's session expires
        procs.append(start_worker(broker_settings, "w-a", tmp_path / "a2.log"))
        procs.append(start_worker(broker_settings, "w-b", tmp_path / "b.log"))
        wait_until(lambda: output_count(broker_settings) >= n, timeout=400, every=1.0, what="all outputs")
        for p in procs[1:]:
            p.send_signal(signal.SIGTERM)
        for p in procs[1:]:
            assert p.wait(90) == 0
    finally:
        for p in procs:
            p.kill()
    acc = answered_once(broker_settings, n)
    # the survivors held records while partitions moved between them
    assert sum(held_count((tmp_path / f).read_text()) for f in ("a2.log", "b.log")) > 0
    workers = {r["worker_id"] for r in acc.results}
    assert {"w-a", "w-b"} <= workers or len(workers) >= 2


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def start_pod(s, worker_id: str, log_path, processes: int = 2, *flags: str) -> subprocess.Popen:
    """`inferlog worker --processes N` on the CPU: one supervisor, N members of the group."""
    return subprocess.Popen([sys.executable, "-m", "inferlog.cli", "worker", "--no-create-topics", "--device", "cpu",
                             "--processes", str(processes), *flags],
                            env=worker_env(s, INFERLOG_WORKER_ID=worker_id, **HOLDING),
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def test_processes_share_the_group_and_one_failing_restarts_the_pod(broker_settings, tmp_path):
    """Several processes per pod (as several feeding one GPU), in the user's mode: a backlog and a
    steady stream on both tiers. Each process is a member with its own worker id; one killed takes
    the pod down (exit 128+9) after the other drained; the pod started again (with its stages
    inline, a changed setting) finishes the log; nothing lost or duplicated on either tier."""
    n = 1500
    submit_texts(broker_settings, [f"{TEXTS[i % 5]} {i}" for i in range(n)])
    pods = []
    try:
        with Stream(broker_settings, rate=20) as stream:
            pod = start_pod(broker_settings, "pod", tmp_path / "pod.log")
            pods.append(pod)
            wait_until(lambda: {r["worker_id"] for r in read_all_results(broker_settings)} >= {"pod-p0", "pod-p1"},
                       timeout=180, every=1.0, what="results from both processes")
            kids = children(pod.pid)
            assert len(kids) == 2
            os.kill(kids[0], signal.SIGKILL)
            assert pod.wait(90) == 128 + signal.SIGKILL, (tmp_path / "pod.log").read_text()[-3000:]
            assert all(not os.path.exists(f"/proc/{k}") or open(f"/proc/{k}/stat").read().split()[2] == "Z"
                       for k in kids)  # the survivor stopped with it
            log = (tmp_path / "pod.log").read_text()
            assert "stopping the others" in log and "drained" in log  # the survivor drained and committed
            again = start_pod(broker_settings, "pod", tmp_path / "pod2.log", 2, "--stages", "inline")
            pods.append(again)
            wait_until(lambda: output_count(broker_settings) >= n, timeout=300, every=1.0, what="the backlog answered")
        total = n + stream.sent
        wait_until(lambda: output_count(broker_settings) >= total, timeout=120, every=1.0, what="all outputs")
        again.send_signal(signal.SIGTERM)
        assert again.wait(90) == 0, (tmp_path / "pod2.log").read_text()[-3000:]
    finally:
        for p in pods:
            p.kill()
    acc = answered_once(broker_settings, total)
    assert {r["worker_id"] for r in acc.results} == {"pod-p0", "pod-p1"}
    tiers = Counter(r["source"]["topic"] for r in acc.results)
    assert tiers[broker_settings.tier_topic("high")] > 0 and tiers[broker_settings.tier_topic("normal")] > n, tiers


def read_all_results(s) -> list[dict]:
    """The committed results so far; none while a transaction holds the reader back."""
    codec = Codec.from_settings(s)
    try:
        return [codec.decode(r.value, expect=RESULT) for r in read_all(s, s.model_results_topic, timeout=5)]
    except TimeoutError:
        return []


def test_high_priority_overtakes_a_backlog_without_starving_it(broker_settings, embed_runner):
    codec = Codec.from_settings(broker_settings)
    normal = [codec.encode(REQUEST, build_request("embed", f"backlog request {i} {TEXTS[i % 5]}")) for i in range(600)]
    produce_raw(broker_settings, [(None, v) for v in normal])
    high_recs = [build_request("embed", f"urgent {i}", priority=5) for i in range(6)]
    produce_raw(broker_settings, [(None, codec.encode(REQUEST, r)) for r in high_recs],
                topic=broker_settings.tier_topic("high"))
    s = broker_settings.with_overrides(max_batch_size=16, max_in_flight=128)
    with running_worker(s, embed_runner) as w:
        wait_until(lambda: output_count(s) >= len(normal) + len(high_recs), timeout=240, what="all results")
    acc = account(s)
    results = sorted(acc.results, key=lambda r: (r["timings"]["completed_at"], r["request_id"]))
    assert len(results) == 606 and not acc.dead_letters
    urgent = {r["request_id"] for r in high_recs}
    ranks = [i for i, r in enumerate(results) if r["request_id"] in urgent]
    # all urgent ones were answered while the backlog of 600 was still mostly waiting
    assert len(ranks) == 6 and max(ranks) < 150, ranks
    assert {r["source"]["topic"] for r in results if r["request_id"] in urgent} == {s.tier_topic("high")}
    assert w.counts["pauses"] > 0  # the backlog was held back by back-pressure, the urgent tier was not

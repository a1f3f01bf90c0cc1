"""Replay against the real broker and the real default model: a time window of both tiers'
request topics reproduces the live results and nothing outside it, a changed model shows up
as drift, an interrupted run resumes without losing or repeating a record, and bad input
writes nothing."""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import torch
from click.testing import CliRunner
from confluent_kafka import Consumer, TopicPartition

from conftest import unique
from inferlog.cli import cli
from inferlog.clients import confluent_config
from inferlog.codec import RESULT, Codec
from inferlog.consumer.flow import FlowControl, steer
from inferlog.consumer.runners import load_runner
from inferlog.producer.sync import Producer
from inferlog.replay import drift, runner as rr, sinks
from inferlog.replay.window import WindowError, WindowReader, parse_time, resolve_window
from inferlog.settings import default_model_path, load_settings
from inferlog.topics import ensure_topics, partition_counts
from support import Fetched, output_count, read_all, running_worker, wait_until

PARTITIONS = 3


@dataclass
class Log:
    settings: object
    groups: list[list[str]]  # request ids of the three groups, in produce order
    high: set[str]  # those sent with a high priority: on the high tier's topic
    t1: int  # epoch ms between group 0 and 1
    t2: int  # between group 1 and 2
    end: int  # after group 2
    originals: dict[str, dict]  # request_id -> live result
    live_offsets: dict[int, int]


@pytest.fixture(scope="module")
def embed_runner():
    return load_runner(default_model_path(), device="cpu")


def committed(s) -> dict[tuple[str, int], int]:
    c = Consumer(confluent_config(s, **{"group.id": s.worker_group}))
    try:
        tps = c.committed([TopicPartition(t, p) for t in s.request_topics for p in range(PARTITIONS)], timeout=30)
        return {(tp.topic, tp.partition): tp.offset for tp in tps}
    finally:
        c.close()


def results_of(s, topic: str) -> list[dict]:
    codec = Codec.from_settings(s)
    return [codec.decode(r.value, expect=RESULT) for r in read_all(s, topic)]


def committed_results(s, topic: str, n: int) -> list[dict]:
    """At least n results of a transactional topic: a commit returns before its markers are
    written, and a read_committed reader sees the records only after them."""
    got: list[dict] = []

    def enough():
        got[:] = results_of(s, topic)
        return len(got) >= n

    wait_until(enough, 30, what=f"{n} results on {topic}")
    return got


@pytest.fixture(scope="module")
def log(kafka, embed_runner) -> Log:
    """Three groups of requests ~1.5 s apart, a third of each on the high tier's topic, all
    answered by a live worker."""
    tag = unique("replay")
    s = load_settings(bootstrap_servers=kafka.bootstrap, requests_topic=f"{tag}.requests",
                      high_priority_topic=f"{tag}.requests.high",
                      results_topic=f"{tag}.results", deadletter_topic=f"{tag}.deadletter", partitions=PARTITIONS,
                      group_id=f"{tag}.workers", worker_id=f"{tag}.w0", max_batch_size=8, max_wait_ms=5)
    ensure_topics(s)
    groups, marks = [], []
    with Producer(s, check_models=False) as p:  # published before the worker starts: nobody announces its model yet
        for g, n in enumerate((8, 12, 8)):
            if g:
                time.sleep(0.75)
                marks.append(int(time.time() * 1000))
                time.sleep(0.75)
            # one request per group names the live model: a replay with another model still answers it
            groups.append([p.submit("embed", f"group {g} text {i}: the parcel arrived late",
                                    model="all-MiniLM-L6-v2" if i == 0 else None, priority=5 * (i % 3 == 1))
                           for i in range(n)])
            p.flush()
    time.sleep(0.5)
    end = int(time.time() * 1000)
    total = sum(map(len, groups))
    with running_worker(s, embed_runner):
        wait_until(lambda: output_count(s) >= total, what="live results")
    originals = {r["request_id"]: r for r in results_of(s, s.model_results_topic)}
    assert len(originals) == total
    high = {rid for g in groups for i, rid in enumerate(g) if i % 3 == 1}
    assert {rid for rid, r in originals.items() if r["source"]["topic"] == s.tier_topic("high")} == high
    return Log(s, groups, high, marks[0], marks[1], end, originals, committed(s))


def fullest(log: Log) -> int:
    """The normal topic's partition with the most records (keys are random: at least 6 of 18)."""
    return max(range(PARTITIONS), key=lambda p: log.live_offsets[(log.settings.tier_topic("normal"), p)])


def vectors(results) -> dict[str, list[float]]:
    return {r["request_id"]: r["outputs"][0]["vector"] for r in results}


def assert_reproduces(log: Log, got: dict[str, list[float]]) -> None:
    assert set(got) == set(log.groups[1]), "exactly the middle group, nothing outside the window"
    for rid, vec in got.items():
        want = log.originals[rid]["outputs"][0]["vector"]
        assert max(abs(a - b) for a, b in zip(vec, want)) < 1e-4


def berlin(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, ZoneInfo("Europe/Berlin")).isoformat()


def test_time_window_reproduces_the_middle_group_to_files_and_a_topic(log, embed_runner, tmp_path):
    s = log.settings
    window = resolve_window(s, s.request_topics, since=berlin(log.t1), until=berlin(log.t2))
    assert window.topics == (s.tier_topic("high"), s.tier_topic("normal"))
    assert window.total == len(log.groups[1]) and log.high & set(log.groups[1]), "both tiers in the window"
    naive = datetime.fromtimestamp(log.t1 / 1000, ZoneInfo("Europe/Berlin")).replace(tzinfo=None).isoformat()
    assert parse_time(naive, "Europe/Berlin") == parse_time(berlin(log.t1)) == log.t1

    for name in ("middle.jsonl", "middle.parquet"):
        summary = rr.start(s, window, rr.output_spec(str(tmp_path / name), None, None), runner=embed_runner,
                           state_dir=tmp_path / "state")
        assert summary.status == "done" and summary.records == window.total
        rows = sinks.read_rows(tmp_path / name)
        assert {r["replay_run_id"] for r in rows} == {summary.run_id}
        assert Counter(r["source_topic"] for r in rows) == {s.tier_topic("high"): 4, s.tier_topic("normal"): 8}
        assert_reproduces(log, vectors(sinks.row_result(r) for r in rows))

    target = unique("replayed")
    summary = rr.start(s, window, rr.output_spec(None, target, None), runner=embed_runner,
                       state_dir=tmp_path / "state", run_id="to-topic")
    assert summary.status == "done" and summary.records == summary.results == window.total, summary
    # the commit returns before its markers are written: a read_committed reader catches up
    got = committed_results(s, target, window.total)
    assert len(got) == window.total and {r["replay_run_id"] for r in got} == {"to-topic"}
    assert_reproduces(log, vectors(got))
    assert committed(s) == log.live_offsets, "the live group's offsets moved"

    res = CliRunner().invoke(cli, ["replay", "compare", "--run-id", "to-topic", "--format", "json"],
                             env=cli_env(log, tmp_path))
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    t = report["tasks"]["EMBED"]
    assert (t["compared"], t["missing_original"], t["missing_replay"]) == (12, 0, 0)
    assert t["close"] == 12 and t["cosine"]["min"] > 1 - 1e-6 and t["cosine"]["lt_1"] == 0
    assert report["most_divergent"] == [] and report["differing"] == 0, "the same model: nothing differs"


@pytest.fixture(scope="module")
def perturbed_model(tmp_path_factory):
    """The default MiniLM with every weight nudged: a different model of the same shape."""
    from transformers import AutoModel, AutoTokenizer

    d = tmp_path_factory.mktemp("perturbed") / "minilm-perturbed"
    model = AutoModel.from_pretrained(default_model_path())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * (p.std() if p.numel() > 1 else 1))
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(d)
    return d


def cli_env(log: Log, tmp_path) -> dict:
    s = log.settings
    return {"INFERLOG_BOOTSTRAP_SERVERS": s.bootstrap_servers, "INFERLOG_REQUESTS_TOPIC": s.requests_topic,
            "INFERLOG_HIGH_PRIORITY_TOPIC": s.high_priority_topic,
            "INFERLOG_RESULTS_TOPIC": s.results_topic, "INFERLOG_REPLAY_DIR": str(tmp_path / "state"),
            "INFERLOG_DEVICE": "cpu"}


def test_another_model_is_reported_as_drift(log, perturbed_model, tmp_path):
    out = tmp_path / "drift.parquet"
    res = CliRunner().invoke(cli, ["replay", "--since", str(log.t1), "--until", str(log.t2), "--out", str(out),
                                   "--model", str(perturbed_model), "--source-model", "all-MiniLM-L6-v2",
                                   "--compare", "--format", "json",
                                   "--json", str(tmp_path / "drift.json")], env=cli_env(log, tmp_path))
    assert res.exit_code == 0, res.output + res.stderr
    assert "warning: the original results of this window name all-MiniLM-L6-v2" in res.stderr
    s = log.settings  # --since covers both tiers by default, and the summary says so
    assert f"from {s.tier_topic('high')} 4/4, {s.tier_topic('normal')} 8/8;" in res.stderr, res.stderr
    report = json.loads(res.stdout)
    assert report == json.loads((tmp_path / "drift.json").read_text())
    t = report["tasks"]["EMBED"]
    assert (t["compared"], t["missing_original"], t["missing_replay"], t["exact"]) == (12, 0, 0, 0)
    assert {d["topic"] for d in report["most_divergent"]} <= set(s.request_topics)
    assert t["cosine"]["eq_1"] == 0 and t["cosine"]["lt_1"] == 12 and t["cosine"]["min"] < 1 - 1e-4
    assert report["replay_models"] == {"minilm-perturbed": 12}
    assert report["original_models"] == {"all-MiniLM-L6-v2": 12}
    assert len(report["most_divergent"]) == 10 and {d["request_id"] for d in report["most_divergent"]} <= set(log.groups[1])
    table = drift.format_report(report)
    assert "EMBED cosine" in table and "most divergent" in table


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory):
    """A tiny BERT encoder 32 wide (the default embeds in 384): another model of another width."""
    from transformers import AutoModel, AutoTokenizer

    from tinymodels import build_tiny_bert_classifier

    base = build_tiny_bert_classifier(tmp_path_factory.mktemp("tiny-cls"))
    d = tmp_path_factory.mktemp("narrow") / "tiny-bert-32"
    AutoModel.from_pretrained(base).save_pretrained(d)  # the encoder without its head: an EMBED model
    AutoTokenizer.from_pretrained(base).save_pretrained(d)
    return d


def test_a_model_of_another_width_is_a_dimension_mismatch(log, narrow_model, tmp_path):
    res = CliRunner().invoke(cli, ["replay", "--since", str(log.t1), "--until", str(log.t2),
                                   "--out", str(tmp_path / "narrow.jsonl"), "--model", str(narrow_model),
                                   "--source-model", "all-MiniLM-L6-v2", "--compare",
                                   "--json", str(tmp_path / "drift.json")], env=cli_env(log, tmp_path))
    assert res.exit_code == 0, res.output + res.stderr
    t = json.loads((tmp_path / "drift.json").read_text())["tasks"]["EMBED"]
    assert (t["compared"], t["dimension_mismatch"], t["mismatched_dims"]) == (12, 12, {"384 vs 32": 12})
    assert "cosine" not in t
    assert "EMBED dimension mismatch: 12 (384 vs 32, original vs replay;" in res.stdout
    assert "cosine 0" not in res.stdout and "EMBED cosine" not in res.stdout


@pytest.mark.parametrize("kind", ["file", "topic"])
def test_interrupted_replay_resumes_each_record_exactly_once(log, embed_runner, tmp_path, kind):
    # max_in_flight 8 of each tier's 10 and 18: records are held past it, handed over in order
    # as commits make room, and those held when the run stops are read again by --resume
    s = log.settings.with_overrides(max_batch_size=4, max_in_flight=8)
    window = resolve_window(s, s.request_topics)  # both tiers: progress is kept per (topic, partition)
    everything = {rid for g in log.groups for rid in g}
    assert window.total == len(everything)
    target = unique("resumed")
    output = rr.output_spec(str(tmp_path / "all.jsonl"), None, None) if kind == "file" else \
        rr.output_spec(None, target, None)
    state = tmp_path / "state"
    first = rr.start(s, window, output, runner=embed_runner, state_dir=state, run_id="cut", checkpoint_s=0,
                     stop_after=5)
    assert first.status == "interrupted" and 5 <= first.records < window.total
    ck = rr.Checkpoint.load(state, "cut")
    assert set(ck.data["offsets"]) <= set(s.request_topics) and rr.records_done(ck, ck.done_offsets()) == first.done
    if kind == "file":  # a part written after the last checkpoint, as a crash leaves it: must be ignored
        (ck.dir / "parts" / f"part-{len(ck.data['parts']) + 1:05d}.jsonl").write_text('{"junk": 1}\n')
        assert not (tmp_path / "all.jsonl").exists()
        # the command line: everything comes from the checkpoint
        res = CliRunner().invoke(cli, ["replay", "--resume", "cut"], env=cli_env(log, tmp_path))
        assert res.exit_code == 0, res.output
        # the whole run's totals, then this invocation's
        assert f"replay cut done: {window.total:,} of {window.total:,} records" in res.stderr
        assert f"this run {window.total - first.records:,} records" in res.stderr
        assert f"from {s.tier_topic('high')} {len(log.high)}/{len(log.high)}, " in res.stderr
    else:
        second = rr.resume(s, "cut", runner=embed_runner, state_dir=state, checkpoint_s=0)
        assert second.status == "done" and first.records + second.records == window.total
        assert second.done == second.total == window.total
        assert second.counts == {"results": window.total, "dead_letters": 0}, "the whole run's totals"
    if kind == "file":
        ids = [r["request_id"] for r in sinks.read_rows(tmp_path / "all.jsonl")]
    else:
        got = committed_results(s, target, window.total)
        ids = [r["request_id"] for r in got if r["replay_run_id"] == "cut"]
    assert Counter(ids) == Counter(everything), "each request exactly once"
    assert rr.resume(s, "cut", runner=embed_runner, state_dir=state).status == "done"  # nothing left to do
    assert committed(s) == log.live_offsets


def test_a_window_readers_tier_that_holds_max_in_flight_pauses_and_resumes_where_it_stopped(log):
    """Replay's back-pressure on a consumer of manually assigned partitions (no group): the
    paused tier's partitions deliver nothing, the other tier reads on; resumed, each goes on
    from where it was, every offset of the window once."""
    s = log.settings.with_overrides(max_in_flight=1)
    high, normal = s.request_topics
    window = resolve_window(s, s.request_topics)
    in_engine = Counter({normal: 1})  # the normal tier has no room
    flow = FlowControl(s, lambda tier: in_engine[s.tier_topic(tier)])
    stand_in = Fetched(normal, 0, -1)  # one held record: as many as max_in_flight, so its tier pauses
    assert flow.take([stand_in]) == []
    reader = WindowReader(s, window)
    try:
        steer(flow, reader.consumer, reader.reading(), stopping=False)
        assert flow.paused == {"high": False, "normal": True}
        got = []
        deadline = time.monotonic() + 30
        while any(t == high for t, _ in reader.reading()) and time.monotonic() < deadline:
            got += reader.poll(0.2)
        assert {m.topic() for m in got} == {high} and len(got) == len(log.high), "the high tier read on alone"
        for _ in range(5):  # the paused tier stays so
            assert reader.poll(0.2) == []
        assert {t for t, _ in reader.reading()} == {normal}
        flow.drop()  # held records handed over (or given up): the tier resumes
        steer(flow, reader.consumer, reader.reading(), stopping=False)
        assert flow.paused == {"high": False, "normal": False}
        deadline = time.monotonic() + 30
        while not reader.done() and time.monotonic() < deadline:
            got += reader.poll(0.2)
    finally:
        reader.close()
    offsets = Counter((m.topic(), m.partition(), m.offset()) for m in got)
    assert set(offsets) == {(r.topic, r.partition, o) for r in window.ranges for o in range(r.start, r.end)}
    assert max(offsets.values()) == 1, "every offset of the window once"


@pytest.mark.parametrize("args, message", [
    (["--topic", "no-such-topic"], "unknown topic"),
    (["--since", "END"], "window of"),  # after the last record: empty
    (["--since", "2099-01-01T00:00:00+01:00"], "in the future"),
    (["--since", "SINCE", "--model", "/nonexistent/model", "--source-model", "all-MiniLM-L6-v2"],
     "cannot load model"),
    (["--since", "SINCE", "--model", "/nonexistent/model"], "no request topics of model '/nonexistent/model'"),
    (["--offsets", "0:5-3"], "end before start"),
    (["--offsets", "0:0-1"], "names no topic"),  # both tiers: an offset needs its topic
])
@pytest.mark.parametrize("output", ["file", "topic"])
def test_bad_input_fails_clearly_and_writes_nothing(log, tmp_path, args, message, output):
    args = [str(log.end) if a == "END" else str(log.t1) if a == "SINCE" else a for a in args]
    target = unique("never")
    out = tmp_path / "never.parquet"
    dest = ["--out", str(out)] if output == "file" else ["--to-topic", target]
    res = CliRunner().invoke(cli, ["replay", *args, *dest], env=cli_env(log, tmp_path))
    assert res.exit_code != 0
    assert message in res.stderr, res.stderr
    assert not out.exists() and not (tmp_path / "state").exists()
    assert not partition_counts(log.settings, [target, f"{target}.deadletter"])


def test_window_errors(log):
    s = log.settings
    with pytest.raises(WindowError, match="after --until"):
        resolve_window(s, s.tier_topic("normal"), since=log.t2, until=log.t1)
    with pytest.raises(WindowError, match="time zone"):
        parse_time("2026-11-23T10:00:00", "Mars/Olympus")
    with pytest.raises(WindowError, match="ISO 8601"):
        parse_time("yesterday-ish")
    w = resolve_window(s, s.tier_topic("normal"), partitions="0,2")
    assert [r.partition for r in w.ranges] == [0, 2]
    p = fullest(log)
    w = resolve_window(s, s.tier_topic('normal'), offsets=f"{p}:1-3")
    assert [(r.partition, r.start, r.end) for r in w.ranges] == [(p, 1, 3)] and w.total == 2
    # both tiers: --partitions applies to each topic, and an offset names its topic
    high, normal = s.request_topics
    w = resolve_window(s, s.request_topics, partitions="1")
    assert [r.tp for r in w.ranges] == [(high, 1), (normal, 1)]
    w = resolve_window(s, s.request_topics, offsets=f"{high}:0:0-1,{normal}:2")
    assert w.topics == (high, normal) and [(r.tp, r.start, r.end) for r in w.ranges][0] == ((high, 0), 0, 1)
    assert [r.tp for r in w.ranges] == [(high, 0), (normal, 2)]
    assert resolve_window(s, s.request_topics, offsets=f"{high}:0").topics == (high,), "only the topics named"
    with pytest.raises(WindowError, match="names no topic"):
        resolve_window(s, s.request_topics, offsets="0:0-1")
    with pytest.raises(WindowError, match="not one of the window's"):
        resolve_window(s, normal, offsets=f"{high}:0:0-1")


class BrokenDevice:
    """The default runner until its device breaks after `good` batches, as a CUDA fault does
    (the error class the pipeline treats as fatal: every later batch would fail too)."""

    def __init__(self, inner, good: int):
        self.inner, self.good = inner, good

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, prepared):
        if self.good <= 0:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.good -= 1
        return self.inner.run(prepared)


@pytest.mark.timeout(180)  # the defect was a hang: the test's own timeout bounds it
@pytest.mark.parametrize("kind", ["file", "topic"])
def test_a_device_failure_stops_replay_with_a_resumable_checkpoint(log, embed_runner, tmp_path, kind):
    s = log.settings.with_overrides(max_batch_size=2, pipeline_depth=1)
    window = resolve_window(s, s.request_topics)
    target = unique("broken")
    output = rr.output_spec(str(tmp_path / "all.jsonl"), None, None) if kind == "file" else \
        rr.output_spec(None, target, None)
    state = tmp_path / "state"
    with pytest.raises(rr.ReplayError, match=r"the device failed: CUDA error.*--resume broken"):
        rr.start(s, window, output, runner=BrokenDevice(embed_runner, good=3), state_dir=state, run_id="broken",
                 checkpoint_s=0)
    ck = rr.Checkpoint.load(state, "broken")
    done_first = rr.records_done(ck, ck.done_offsets())
    assert 0 < done_first < window.total, "what finished before the fault is kept"
    second = rr.resume(s, "broken", runner=embed_runner, state_dir=state, checkpoint_s=0)
    assert second.status == "done" and second.done == window.total
    assert second.counts == {"results": window.total, "dead_letters": 0}
    if kind == "file":
        ids = [r["request_id"] for r in sinks.read_rows(tmp_path / "all.jsonl")]
    else:
        ids = [r["request_id"] for r in committed_results(s, target, window.total)]
    assert Counter(ids) == Counter(rid for g in log.groups for rid in g), "each request exactly once"


@pytest.mark.timeout(300)
def test_sigint_mid_replay_stops_soon_keeps_what_finished_and_resume_reports_the_whole_run(log, tmp_path):
    """The CLI as a user runs it, with the default max_in_flight (the whole window fetched at
    once) and a slow device (0.3 s a batch of 2): Ctrl-C stops it, not the end of the window."""
    import signal
    import subprocess
    import sys

    env = {**__import__("os").environ, **cli_env(log, tmp_path), "INFERLOG_MAX_BATCH_SIZE": "2",
           "INFERLOG_FAULT_SLOW_MS": "300", "INFERLOG_FAULT_SLOW_RATE": "1"}
    out = tmp_path / "all.jsonl"
    window = resolve_window(log.settings, log.settings.request_topics)
    proc = subprocess.Popen([sys.executable, "-m", "inferlog.cli", "replay", "--out", str(out), "--run-id", "ctrlc",
                             "--checkpoint-interval", "0.2"], env=env, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "state" / "ctrlc" / "parts"
    wait_until(lambda: parts.exists() and any(parts.iterdir()), timeout=120, what="a first checkpoint")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    ck = rr.Checkpoint.load(tmp_path / "state", "ctrlc")
    done_first = rr.records_done(ck, ck.done_offsets())
    # at 2 requests per 0.3 s the rest of the window would take seconds more: it was not run
    assert 0 < done_first < window.total, err
    assert f"interrupted: {done_first:,} of {window.total:,} records" in err
    assert "continue with: inferlog replay --resume ctrlc" in err and not out.exists()

    res = CliRunner().invoke(cli, ["replay", "--resume", "ctrlc"], env=cli_env(log, tmp_path))
    assert res.exit_code == 0, res.output
    assert f"replay ctrlc done: {window.total:,} of {window.total:,} records" in res.stderr
    assert f"{window.total:,} results, 0 dead letters in all" in res.stderr
    assert f"this run {window.total - done_first:,} records" in res.stderr
    ids = [r["request_id"] for r in sinks.read_rows(out)]
    assert Counter(ids) == Counter(rid for g in log.groups for rid in g), "each request exactly once"


def test_resume_with_nothing_left_loads_no_model(log, embed_runner, tmp_path, monkeypatch):
    s = log.settings
    p = fullest(log)
    window = resolve_window(s, s.tier_topic('normal'), offsets=f"{p}:0-2")
    output = rr.output_spec(str(tmp_path / "two.jsonl"), None, None)
    state = tmp_path / "state"
    first = rr.start(s, window, output, runner=embed_runner, state_dir=state, run_id="cut", checkpoint_s=0,
                     stop_after=2)  # every record committed, the run left unfinished
    assert first.status == "interrupted" and first.done == first.total == 2
    # a checkpoint of version 1 (one topic, offsets keyed by partition) still resumes
    ck = rr.Checkpoint.load(state, "cut")
    assert [r.tp for r in ck.window.ranges] == [(s.tier_topic("normal"), p)]
    ck.path.write_text(json.dumps({**ck.data, "version": 1, "offsets": {str(p): 2}, "window": {
        "topic": s.tier_topic("normal"), "since_ms": None, "until_ms": None, "ranges": [[p, 0, 2]]}}))
    import inferlog.consumer.runners as runners

    def no_model(_):
        raise AssertionError("the model was loaded with nothing left to do")

    monkeypatch.setattr(runners, "build_runner", no_model)
    again = rr.resume(s, "cut", state_dir=state)
    assert again.status == "done" and again.records == 0 and again.done == 2 and again.counts["results"] == 2
    assert again.topics == {s.tier_topic("normal"): (2, 2)}
    saved = json.loads(ck.path.read_text())
    assert (saved["version"], saved["offsets"]) == (2, {s.tier_topic("normal"): {str(p): 2}}), "saved as version 2"
    assert len(sinks.read_rows(tmp_path / "two.jsonl")) == 2

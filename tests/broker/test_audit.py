"""Audit against the real broker and the real default model: one module-wide log of
requests on both tiers' topics, answered by a real worker in three phases (so that time
windows can be exact), then looked up, queried with SQL and exported
(tests/unit/test_audit_offline.py: the parts that need no broker)."""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from confluent_kafka import Producer as KafkaProducer

from conftest import unique
from inferlog.clients import confluent_config
from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec
from inferlog.consumer.runners import load_runner
from inferlog.producer.sync import Producer
from inferlog.replay.audit import audit_export, audit_get, audit_sql, lookup, partition_for
from inferlog.request import build_request, now_ms
from inferlog.settings import default_model_path, load_settings
from inferlog.topics import ensure_topics
from support import output_count, produce_raw, read_all, running_worker, wait_until

# tenant -> requests, per phase; the window [t1, t2) holds phase B exactly
PHASE_A = {"acme": 120, "globex": 90, "initech": 60}
PHASE_B = {"umbrella": 24}
PHASE_C = {"acme": 60, "hooli": 60}
BAD_B = 2  # requests of phase B that become dead letters (INVALID_REQUEST)
HIGH_EVERY = 4  # every 4th request of a tenant is sent with a high priority: the high tier's topic


@dataclass
class World:
    settings: object
    t0: int  # before everything
    t1: int  # phase B starts
    t2: int  # phase B and its outputs are done
    t3: int  # after everything
    requests: dict  # request_id -> (topic, partition, offset, record)
    results: dict  # request_id -> decoded result
    dead: dict  # request_id -> decoded dead letter
    phase_b: set
    bad: set
    high: set  # request ids on the high tier's topic
    replay: str  # a replay's results topic (3 partitions), with its .deadletter topic

    def args(self, *extra) -> list[str]:
        s = self.settings
        return [*extra, *topic_args(s)]


def topic_args(s) -> list[str]:
    return ["--bootstrap-servers", s.bootstrap_servers, "--requests-topic", s.requests_topic,
            "--high-priority-topic", s.high_priority_topic, "--results-topic", s.results_topic,
            "--deadletter-topic", s.deadletter_topic]


def _tick() -> int:
    """now, with a millisecond of clear air on both sides: Kafka timestamps are in ms."""
    time.sleep(0.002)
    t = now_ms()
    time.sleep(0.002)
    return t


def _submit(settings, counts: dict[str, int], phase: str) -> list[str]:
    with Producer(settings) as p:
        return [p.submit("embed", f"{phase}: {tenant} asks question {i} about a late parcel", tenant=tenant,
                         priority=5 * (i % HIGH_EVERY == 1))
                for tenant, n in counts.items() for i in range(n)]


@pytest.fixture(scope="module")
def world(kafka) -> World:
    tag = unique("audit")
    s = load_settings(bootstrap_servers=kafka.bootstrap, requests_topic=f"{tag}.requests",
                      high_priority_topic=f"{tag}.requests.high", results_topic=f"{tag}.results",
                      deadletter_topic=f"{tag}.deadletter", partitions=6, group_id=f"{tag}.workers",
                      worker_id=f"{tag}.w0", max_wait_ms=5)
    ensure_topics(s)
    codec = Codec.from_settings(s)
    runner = load_runner(default_model_path(), device="cpu")
    t0 = _tick()
    with running_worker(s, runner):
        n = len(_submit(s, PHASE_A, "A"))
        wait_until(lambda: output_count(s) >= n, timeout=120, what="phase A")
        t1 = _tick()
        b = _submit(s, PHASE_B, "B")
        bad = [build_request("embed", "x", tenant="umbrella") for _ in range(BAD_B)]
        for rec in bad:
            rec["inputs"] = ["   "]  # decodes, but no worker answers a blank input
        produce_raw(s, [(r["request_id"].encode(), codec.encode(REQUEST, r)) for r in bad])
        n += len(b) + BAD_B
        wait_until(lambda: output_count(s) >= n, timeout=60, what="phase B")
        t2 = _tick()
        n += len(_submit(s, PHASE_C, "C"))
        wait_until(lambda: output_count(s) >= n, timeout=120, what="phase C")
        t3 = _tick()
    requests = {}
    for r in read_all(s, s.tier_topic("normal")) + read_all(s, s.tier_topic("high")):
        rec = codec.decode(r.value, expect=REQUEST)
        requests[rec["request_id"]] = (r.topic, r.partition, r.offset, rec)
    results = {d["request_id"]: d for d in (codec.decode(r.value, expect=RESULT) for r in read_all(s, s.model_results_topic))}
    at = {(t, p, o): rid for rid, (t, p, o, _) in requests.items()}
    dead = {at[d["source"]["topic"], d["source"]["partition"], d["source"]["offset"]]: d
            for d in (codec.decode(r.value, expect=DEADLETTER) for r in read_all(s, s.model_deadletter_topic))}
    assert len(results) + len(dead) == len(requests) == n
    high = {rid for rid, (t, *_) in requests.items() if t == s.tier_topic("high")}
    assert high and high <= set(results), "the worker answers the high tier too"
    # a replay of phase B to other topics, as `inferlog replay --to-topic` writes it
    replay = f"{tag}.replay"
    ensure_topics(s, [replay, f"{replay}.deadletter"], partitions=3)
    p = KafkaProducer(confluent_config(s, partitioner="murmur2_random"))
    for rid in b:
        again = {**results[rid], "replay_run_id": "run-1", "model": {**results[rid]["model"], "revision": "v2"}}
        p.produce(replay, codec.encode(RESULT, again), rid.encode())
    for rid in dead:
        p.produce(f"{replay}.deadletter", codec.encode(DEADLETTER, {**dead[rid], "replay_run_id": "run-1"}), rid.encode())
    assert p.flush(30) == 0
    return World(s, t0, t1, t2, t3, requests, results, dead, set(b), set(dead), high, replay)


def invoke(cmd, args):
    return CliRunner().invoke(cmd, [str(a) for a in args])


# -- get ---------------------------------------------------------------------------------------
def test_get_finds_a_request_of_either_tier_on_any_partition_with_its_result(world):
    s = world.settings
    first = {}  # (topic, partition) -> a request answered with a result
    for rid, (t, p, _, _) in world.requests.items():
        if rid in world.results:
            first.setdefault((t, p), rid)
    assert sorted(first) == sorted((t, p) for t in s.request_topics for p in range(6)), \
        "the requests should cover all 6 partitions of both topics"
    for t, p in ((s.tier_topic("normal"), 0), (s.tier_topic("normal"), 3), (s.tier_topic("high"), 5)):
        rid = first[t, p]
        _, _, offset, _ = world.requests[rid]
        res = invoke(audit_get, world.args(rid, "--json"))
        assert res.exit_code == 0, res.output
        got = json.loads(res.stdout)
        assert (got["request"]["topic"], got["request"]["partition"], got["request"]["offset"]) == (t, p, offset)
        assert got["request"]["record"]["request_id"] == rid and not got["dead_letters"]
        [r] = got["results"]
        # the worker's murmur2_random put the result where our murmur2 says
        assert r["partition"] == partition_for(rid.encode(), 6)
        rec = r["record"]
        assert rec["source"] == {"topic": t, "partition": p, "offset": offset}
        assert rec["model"] == world.results[rid]["model"] and rec["model"]["name"] == "all-MiniLM-L6-v2"
        assert rec["timings"] == pytest.approx(world.results[rid]["timings"])
        assert rec["timings"]["created_at"] <= rec["timings"]["consumed_at"] <= rec["timings"]["completed_at"]
    # the block for people names the same things
    rid = first[s.tier_topic("normal"), 4]
    _, _, offset, rec = world.requests[rid]
    t = world.results[rid]["timings"]
    res = invoke(audit_get, world.args(rid))
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert f"request {rid}" in out and f"{s.tier_topic('normal')} p4@{offset}" in out
    assert f"source     {s.tier_topic('normal')} p4@{offset}" in out
    assert "all-MiniLM-L6-v2" in out and world.results[rid]["model"]["digest"] in out
    assert f"completed +{t['completed_at'] - t['created_at']} ms" in out
    assert f"tenant     {rec['tenant']}" in out and "status     OK" in out


def test_a_time_hint_narrows_the_read_to_a_few_records(world):
    s = world.settings
    rid = sorted(world.phase_b)[0]
    hinted = lookup(s, rid, since_ms=world.t1, until_ms=world.t2)
    unhinted = lookup(s, rid)
    for found in (hinted, unhinted):
        assert found.request.record["request_id"] == rid
        assert [h.record["request_id"] for h in found.results] == [rid]
    total = 2 * len(world.requests)  # requests + results and dead letters
    assert hinted.records_read < unhinted.records_read
    assert hinted.records_read <= total / 10, hinted.read


def test_get_a_dead_lettered_request_scans_only_the_window(world):
    rid = sorted(world.bad)[0]
    found = lookup(world.settings, rid, since_ms=world.t1, until_ms=world.t2)
    _, p, offset, _ = world.requests[rid]
    assert (found.request.partition, found.request.offset) == (p, offset)
    assert not found.results
    [d] = found.dead_letters
    assert d.record["reason"] == "INVALID_REQUEST" and d.record["source"]["offset"] == offset
    # no result names its position, so the requests of the window are scanned, and only them
    # (produce_raw's partitioner is not murmur2: the id's own partition may not hold it)
    assert found.read[world.settings.tier_topic("normal")] <= len(world.phase_b) + BAD_B, found.read
    assert found.records_read <= 2 * len(world.requests) / 10, found.read
    res = invoke(audit_get, world.args(rid, "--since", world.t1, "--until", world.t2))
    assert res.exit_code == 0 and "reason     INVALID_REQUEST" in res.stdout, res.output


def test_get_an_unknown_id_says_so_and_exits_1(world):
    res = invoke(audit_get, world.args("no-such-request", "--since", world.t1, "--until", world.t2))
    assert res.exit_code == 1
    assert "no request, result or dead letter with request_id 'no-such-request'" in res.output


def test_replays_on_other_topics_are_found_with_the_original(world):
    rid = sorted(world.phase_b)[1]
    res = invoke(audit_get, world.args(rid, "--json", "--since", world.t1, "--until", world.t2,
                                       "--replay-topic", world.replay))
    assert res.exit_code == 0, res.output
    by_run = {r["record"]["replay_run_id"]: r for r in json.loads(res.stdout)["results"]}
    assert set(by_run) == {None, "run-1"}
    # the replay topic has 3 partitions: the key hashes over those
    assert (by_run["run-1"]["topic"], by_run["run-1"]["partition"]) == (world.replay, partition_for(rid.encode(), 3))
    res = invoke(audit_get, world.args(rid, "--replay-topic", world.replay))
    assert "result 1/2 (original)" in res.stdout and "result 2/2 (replay run-1)" in res.stdout, res.output
    bad = sorted(world.bad)[0]
    res = invoke(audit_get, world.args(bad, "--json", "--since", world.t1, "--until", world.t2,
                                       "--replay-topic", world.replay))
    assert res.exit_code == 0, res.output
    dead = json.loads(res.stdout)["dead_letters"]
    assert sorted(d["topic"] for d in dead) == [world.settings.model_deadletter_topic, f"{world.replay}.deadletter"]
    q = ("SELECT coalesce(replay_run_id, 'original') AS run, count(*) AS n FROM results GROUP BY 1 ORDER BY 1")
    res = invoke(audit_sql, world.args(q, "--since", world.t1, "--replay-topic", world.replay))
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines()[2:-1]]
    assert rows == [["original", str(len(world.phase_b) + sum(PHASE_C.values()))], ["run-1", str(len(world.phase_b))]]


# -- sql ---------------------------------------------------------------------------------------
PER_TENANT = """
    SELECT q.tenant, count(*) AS n,
           quantile_cont(r.latency_ms, 0.5) AS p50, quantile_cont(r.latency_ms, 0.95) AS p95
    FROM requests q JOIN results r USING (request_id)
    GROUP BY q.tenant ORDER BY q.tenant
"""


def test_sql_joins_requests_and_results_per_tenant(world, tmp_path):
    out = tmp_path / "tenants.parquet"
    res = invoke(audit_sql, world.args(PER_TENANT, "--since", world.t0, "--until", world.t3, "--out", out))
    assert res.exit_code == 0, res.output
    got = pq.read_table(out).to_pylist()
    want = Counter()
    for counts in (PHASE_A, PHASE_B, PHASE_C):
        want.update(counts)
    assert {r["tenant"]: r["n"] for r in got} == dict(want)
    latency = {}
    for r in world.results.values():
        latency.setdefault(r["tenant"], []).append(r["timings"]["completed_at"] - r["timings"]["created_at"])
    for r in got:
        lat = np.array(latency[r["tenant"]], dtype=float)
        assert r["p50"] == pytest.approx(np.quantile(lat, 0.5))
        assert r["p95"] == pytest.approx(np.quantile(lat, 0.95))
    # printed for people, and as CSV
    res = invoke(audit_sql, world.args(PER_TENANT, "--since", world.t0))
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].split() == ["tenant", "n", "p50", "p95"]
    assert "acme" in res.stdout and "(5 rows)" in res.stdout
    csv = tmp_path / "tenants.csv"
    assert invoke(audit_sql, world.args(PER_TENANT, "--since", world.t0, "--out", csv)).exit_code == 0
    assert pacsv.read_csv(csv).column("n").to_pylist() == [r["n"] for r in got]


def test_sql_windows_are_exact_at_their_edges(world):
    # [t1, t2) is phase B: its requests, their results and dead letters, nothing of A or C
    q = ("SELECT (SELECT count(*) FROM requests) AS q, (SELECT count(*) FROM results) AS r, "
         "(SELECT count(*) FROM dead_letters) AS d, "
         "(SELECT string_agg(DISTINCT tenant) FROM requests) AS tenants")
    res = invoke(audit_sql, world.args(q, "--since", world.t1, "--until", world.t2))
    assert res.exit_code == 0, res.output
    row = res.stdout.splitlines()[2].split()
    assert row == [str(len(world.phase_b) + BAD_B), str(len(world.phase_b)), str(BAD_B), "umbrella"]


BY_TIER = """
    SELECT q.tier, q.topic, count(*) AS requests, count(r.request_id) AS answered,
           count(*) FILTER (WHERE r.tier = q.tier) AS same_tier
    FROM requests q LEFT JOIN results r
      ON r.source_topic = q.topic AND r.source_partition = q.partition AND r.source_offset = q.offset
    GROUP BY ALL ORDER BY 1
"""


def test_both_tiers_are_in_every_table_joined_and_named_on_stderr(world, tmp_path):
    s = world.settings
    high, normal = len(world.high), len(world.requests) - len(world.high)
    res = invoke(audit_sql, world.args(BY_TIER, "--since", world.t0, "--until", world.t3))
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines()[2:-1]]
    assert rows == [["high", s.tier_topic("high"), str(high), str(high), str(high)],
                    ["normal", s.tier_topic("normal"), str(normal), str(normal - BAD_B), str(normal - BAD_B)]]
    # which topics the window covered, on stderr: stdout is the answer alone
    assert f"requests: {len(world.requests)} rows from {s.tier_topic('high')} {high}, {s.tier_topic('normal')} {normal} " \
        in res.stderr, res.stderr
    assert f"results: {len(world.results)} rows from {s.model_results_topic} {len(world.results)} " in res.stderr
    assert s.tier_topic("high") not in res.stdout.splitlines()[0]
    out = tmp_path / "lake"
    res = invoke(audit_export, world.args("--since", world.t0, "--until", world.t3, "--out", out))
    assert res.exit_code == 0, res.output
    q, r = pq.read_table(out / "requests.parquet"), pq.read_table(out / "results.parquet")
    assert Counter(q.column("tier").to_pylist()) == {"high": high, "normal": normal}
    assert Counter(r.column("tier").to_pylist()) == {"high": high, "normal": normal - BAD_B}
    assert set(q.column("request_id").to_pylist()) == set(world.requests)


def test_out_of_order_timestamps_at_the_edges_are_filtered_per_record(broker_settings):
    """offsets_for_times cuts by offset; a record stamped out of order inside that cut must still go."""
    codec = Codec.from_settings(broker_settings)
    since = now_ms() - 600_000
    until = since + 100
    stamps = [since - 1, since, since - 5, since + 1, until - 1, until, until + 1]  # since - 5 is late
    p = KafkaProducer(confluent_config(broker_settings))
    for part in range(6):
        for ts in stamps:
            rec = build_request("embed", f"stamped {ts}")
            p.produce(broker_settings.tier_topic("normal"), codec.encode(REQUEST, rec), rec["request_id"].encode(),
                      partition=part, timestamp=ts)
    assert p.flush(30) == 0
    q = "SELECT epoch_ms(kafka_ts) AS ts, count(*) AS n FROM requests GROUP BY 1 ORDER BY 1"
    args = [*topic_args(broker_settings), "--since", since, "--until", until]
    res = invoke(audit_sql, [q, *args])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines()[2:-1]]
    assert rows == [[str(since), "6"], [str(since + 1), "6"], [str(until - 1), "6"]]


# -- export ------------------------------------------------------------------------------------
def test_export_writes_three_parquet_files(world, tmp_path):
    out = tmp_path / "lake"
    res = invoke(audit_export, world.args("--since", world.t0, "--until", world.t3, "--out", out))
    assert res.exit_code == 0, res.output
    assert sorted(f.name for f in out.iterdir()) == ["dead_letters.parquet", "requests.parquet", "results.parquet"]
    rows = {f.stem: pq.read_table(f) for f in out.iterdir()}
    assert rows["requests"].num_rows == len(world.requests)
    assert rows["results"].num_rows == len(world.results)
    assert rows["dead_letters"].num_rows == len(world.dead) == BAD_B
    assert set(rows["results"].column("request_id").to_pylist()) == set(world.results)
    assert rows["dead_letters"].column("reason").to_pylist() == ["INVALID_REQUEST"] * BAD_B
    # the worker leaves request_id out of an invalid request's dead letter; the table recovers it
    assert set(rows["dead_letters"].column("request_id").to_pylist()) == world.bad
    assert "embeddings" not in rows["results"].column_names  # only with --vectors


# -- bad input -----------------------------------------------------------------------------------
def test_no_results_or_dead_letter_topic_at_all_is_one_clear_line(world, tmp_path):
    # the request topics are there, but no model's results or dead-letter topics (nor the shared ones)
    s = world.settings.with_overrides(results_topic=f"{world.settings.results_topic}-none",
                                      deadletter_topic=f"{world.settings.deadletter_topic}-none")
    rid = sorted(world.phase_b)[0]
    for cmd, args in ((audit_get, [rid]), (audit_sql, ["SELECT count(*) FROM requests", "--since", world.t0]),
                      (audit_export, ["--since", world.t0, "--out", tmp_path / "lake"]),
                      (audit_export, ["--since", world.t0, "--format", "openai-batch", "--out", tmp_path / "b.jsonl"])):
        res = invoke(cmd, [*args, *topic_args(s)])
        assert res.exit_code == 2, res.output
        assert "no results or dead-letter topics on" in res.output and s.results_topic in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["unknown topic", "empty window", "future window", "since after until",
                                  "malformed sql", "unknown column", "bad out suffix"])
def test_bad_input_is_refused_with_a_clear_message_and_nothing_written(world, tmp_path, case):
    t0, now = world.t0, now_ms()
    query, window, extra, want = "SELECT count(*) FROM requests", ["--since", t0], [], None
    if case == "unknown topic":
        extra, want = ["--replay-topic", "no-such-topic"], "unknown topic 'no-such-topic'"
    elif case == "empty window":
        window, want = ["--since", t0 - 7_200_000, "--until", t0 - 3_600_000], "no records between"
    elif case == "future window":
        window, want = ["--since", now + 3_600_000], "is in the future"
    elif case == "since after until":
        window, want = ["--since", world.t2, "--until", world.t1], "is after --until"
    elif case == "malformed sql":
        query, want = "SELEC count(*) FROM requests", "Parser Error"
    elif case == "unknown column":
        query, want = "SELECT no_such_column FROM results", "no_such_column"
    out = tmp_path / ("answer.txt" if case == "bad out suffix" else "answer.parquet")
    want = want or "must end in .csv or .parquet"
    res = invoke(audit_sql, world.args(query, *window, *extra, "--out", out))
    assert res.exit_code == 2 and want in res.output, res.output
    assert "Traceback" not in res.output
    assert not list(tmp_path.iterdir())
    if case in ("unknown topic", "empty window", "future window"):
        lake = tmp_path / "lake"
        res = invoke(audit_export, world.args(*window, *extra, "--out", lake))
        assert res.exit_code == 2 and want in res.output, res.output
        assert not lake.exists()

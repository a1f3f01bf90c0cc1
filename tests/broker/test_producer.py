"""The producer SDKs (sync, asyncio) and `inferlog produce`, against a real broker
(tests/unit/test_producer_offline.py: what needs none)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
from click.testing import CliRunner
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from opentelemetry.sdk.trace import TracerProvider

from inferlog.clients import confluent_config
from inferlog.codec import REQUEST, Codec
from inferlog.errors import InvalidRequest
from inferlog.producer.aio import AsyncProducer
from inferlog.producer.cli import TokenBucket, produce
from inferlog.producer.sync import Producer, ProduceError
from inferlog.request import validate_request
from inferlog.topics import ensure_topics
from support import cli_env


# -- helpers ---------------------------------------------------------------------------------
def end_offsets(settings, topic=None) -> dict[int, int]:
    topic = topic or settings.tier_topic("normal")
    c = Consumer(confluent_config(settings, **{"group.id": f"probe-{uuid.uuid4().hex[:8]}"}))
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: _high_watermark(c, TopicPartition(topic, p)) for p in parts}
    finally:
        c.close()


_NOT_READY = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT}


def _high_watermark(c: Consumer, tp: TopicPartition) -> int:
    # A topic created a moment ago may still answer NOT_LEADER for a short while.
    deadline = time.monotonic() + 15
    while True:
        try:
            return c.get_watermark_offsets(tp, timeout=10)[1]
        except KafkaException as e:
            err = e.args[0]
            if not (err.retriable() or err.code() in _NOT_READY) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_all(settings, topic=None) -> list:
    """Every record on the topic, read by partition up to the end offsets."""
    topic = topic or settings.tier_topic("normal")
    ends = {p: e for p, e in end_offsets(settings, topic).items() if e > 0}
    c = Consumer(confluent_config(settings, **{"group.id": f"reader-{uuid.uuid4().hex[:8]}",
                                               "enable.auto.commit": False}))
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    out, deadline = [], time.monotonic() + 60
    try:
        while ends and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=1):
                assert m.error() is None, m.error()
                out.append(m)
                if m.offset() >= ends[m.partition()] - 1:
                    ends.pop(m.partition(), None)
    finally:
        c.close()
    assert not ends, f"partitions not read to their end: {ends}"
    return out


def decode(settings, msg) -> dict:
    rec = Codec.from_settings(settings).decode(msg.value(), expect=REQUEST)
    validate_request(rec)  # what a worker would check
    return rec


def headers(msg) -> dict[str, bytes]:
    return dict(msg.headers() or [])


# -- SDKs against the broker -----------------------------------------------------------------
def test_sync_submit_round_trips(broker_settings):
    # check_models=False: the round trip of every field, "tiny-gpt2" included, with no worker serving
    # it; its requests go to its own topics (made here, as its worker would), the others' to the default's
    tiny = broker_settings.with_overrides(model_name="tiny-gpt2")
    ensure_topics(tiny, list(tiny.request_topics))
    with Producer(broker_settings, check_models=False) as p:
        rid = p.submit("generate", "once upon a time", model="tiny-gpt2", tenant="acme",
                       parameters={"max_new_tokens": 8, "seed": 7}, priority=5,
                       deadline_ms=1_900_000_000_000, metadata={"trace": "abc"})
        rid2 = p.submit("embed", ["a", "b"], request_id="my-id")
        p.flush()
        assert p.ledger.delivered == 2
    assert rid2 == "my-id"
    high = read_all(broker_settings, tiny.tier_topic("high"))
    assert [m.key() for m in high] == [rid.encode()]  # priority 5 >= high_priority: its model's high tier
    assert read_all(broker_settings, tiny.tier_topic("normal")) == []
    msgs = {m.key(): m for m in read_all(broker_settings) + high}
    assert set(msgs) == {rid.encode(), b"my-id"}  # no key given: the request_id is the key
    rec = decode(broker_settings, msgs[rid.encode()])
    assert (rec["request_id"], rec["task"], rec["inputs"], rec["model"], rec["tenant"]) == (
        rid, "GENERATE", ["once upon a time"], "tiny-gpt2", "acme")
    assert rec["parameters"]["max_new_tokens"] == 8 and rec["parameters"]["seed"] == 7
    assert (rec["priority"], rec["deadline"], rec["metadata"]) == (5, 1_900_000_000_000, {"trace": "abc"})
    assert decode(broker_settings, msgs[b"my-id"])["inputs"] == ["a", "b"]
    assert REQUEST.encode() in headers(msgs[b"my-id"])["content-type"]


def test_async_submit_round_trips(broker_settings):
    async def main():
        async with AsyncProducer(broker_settings) as p:
            one = await p.submit("embed", ["hello", "world"], tenant="acme")
            many = await p.submit_many([{"task": "classify", "inputs": [f"t{i}"], "request_id": f"c{i}"}
                                        for i in range(20)])
            await p.flush()
            assert p.ledger.delivered == 21
        return one, many

    one, many = asyncio.run(main())
    assert many == [f"c{i}" for i in range(20)]
    recs = {r["request_id"]: r for r in (decode(broker_settings, m) for m in read_all(broker_settings))}
    assert set(recs) == {one, *many}
    assert recs[one]["inputs"] == ["hello", "world"] and recs[one]["tenant"] == "acme"
    assert all(recs[f"c{i}"]["inputs"] == [f"t{i}"] and recs[f"c{i}"]["task"] == "CLASSIFY" for i in range(20))


def test_submit_many_with_one_bad_request_sends_nothing(broker_settings):
    good = [{"task": "embed", "inputs": [f"x{i}"]} for i in range(5)]
    bad = good[:2] + [{"task": "embed", "inputs": [""]}] + good[2:]
    with Producer(broker_settings) as p:
        with pytest.raises(InvalidRequest, match=r"requests\[2\]"):
            p.submit_many(bad)
        p.flush()
        assert sum(end_offsets(broker_settings).values()) == 0

        async def aio():
            async with AsyncProducer(broker_settings) as ap:
                with pytest.raises(InvalidRequest, match=r"requests\[2\]"):
                    await ap.submit_many(bad)

        asyncio.run(aio())
        assert sum(end_offsets(broker_settings).values()) == 0
        # the same batch without the bad one does arrive: the count above could see it
        assert len(p.submit_many(good)) == 5
    assert sum(end_offsets(broker_settings).values()) == 5


def test_a_key_pins_its_requests_to_one_partition_in_both_sdks(broker_settings):
    with Producer(broker_settings) as p:
        for i in range(40):
            p.submit("embed", [f"mine {i}"], key="user-42")
            p.submit("embed", [f"other {i}"])

    async def aio():
        async with AsyncProducer(broker_settings) as ap:
            for i in range(20):
                await ap.submit("embed", [f"mine async {i}"], key=b"user-42")

    asyncio.run(aio())
    msgs = read_all(broker_settings)
    mine = [m for m in msgs if m.key() == b"user-42"]
    others = [m for m in msgs if m.key() != b"user-42"]
    assert len(mine) == 60 and len(others) == 40
    # same partition from librdkafka and aiokafka (both hash keys with murmur2)
    assert len({m.partition() for m in mine}) == 1
    assert len({m.partition() for m in others}) > 1
    # one partition keeps their order
    sync_inputs = [decode(broker_settings, m)["inputs"][0] for m in sorted(mine, key=lambda m: m.offset())][:40]
    assert sync_inputs == [f"mine {i}" for i in range(40)]


def test_current_span_travels_as_traceparent(broker_settings):
    tracer = TracerProvider().get_tracer("test")
    with Producer(broker_settings) as p:
        with tracer.start_as_current_span("upstream") as span:
            traced = p.submit("embed", ["traced"])
        untraced = p.submit("embed", ["untraced"])

    async def aio():
        async with AsyncProducer(broker_settings) as ap:
            with tracer.start_as_current_span("upstream-async") as aspan:
                return await ap.submit("embed", ["traced async"]), aspan.get_span_context()

    atraced, actx = asyncio.run(aio())
    by_rid = {m.key().decode(): headers(m) for m in read_all(broker_settings)}
    for rid, ctx in ((traced, span.get_span_context()), (atraced, actx)):
        want = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
        assert by_rid[rid]["traceparent"] == want.encode()
    assert "traceparent" not in by_rid[untraced]
    assert all(h["content-type"].startswith(b"application/vnd.apache.avro+binary") for h in by_rid.values())


def test_a_failed_delivery_is_raised_at_a_later_call(broker_settings):
    # Topics are never auto-created: records for a missing topic fail after message.timeout.ms.
    p = Producer(broker_settings, requests_topic=f"missing-{uuid.uuid4().hex[:8]}", **{"message.timeout.ms": 1000})
    first = p.submit("embed", ["lost"])
    deadline = time.monotonic() + 20
    with pytest.raises(ProduceError) as raised:
        while time.monotonic() < deadline:
            p.submit("embed", ["probe"])
            time.sleep(0.2)
    assert raised.value.failures[0][0] == first
    assert raised.value.reason in ("_MSG_TIMED_OUT", "_UNKNOWN_TOPIC", "UNKNOWN_TOPIC_OR_PART")
    with pytest.raises(ProduceError):
        p.close(timeout=10)  # the probes failed too, and flush says so


# -- the CLI --------------------------------------------------------------------------------
def test_cli_produces_10000_requests_over_all_partitions(broker_settings, tmp_path):
    n = 10_000
    src = tmp_path / "requests.jsonl"
    src.write_text("".join(json.dumps({"task": "embed", "inputs": [f"sentence number {i}"], "request_id": f"req-{i}"})
                           + "\n" for i in range(n)))
    env = {**os.environ, **cli_env(broker_settings)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "inferlog.cli", "produce", str(src),
                           "--topic", broker_settings.requests_topic], env=env, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = re.search(r"sent (\d+) requests .* \(([\d,]+) records/s\)", proc.stderr)
    assert summary and int(summary[1]) == n, proc.stderr[-3000:]
    print(f"\nCLI: {n} records; its own rate {summary[2]} records/s; {elapsed:.2f} s with interpreter start-up")

    msgs = read_all(broker_settings)
    assert len(msgs) == n
    recs = [decode(broker_settings, m) for m in msgs]
    assert sorted(r["request_id"] for r in recs) == sorted(f"req-{i}" for i in range(n))
    assert all(r["inputs"] == [f"sentence number {r['request_id'][4:]}"] and r["task"] == "EMBED" for r in recs)
    per_partition = {p: e for p, e in end_offsets(broker_settings).items()}
    assert len(per_partition) == 6 and all(e > 0 for e in per_partition.values()), per_partition


def test_cli_shorthand_lines_take_the_option_defaults(broker_settings, tmp_path):
    plain, keyed = tmp_path / "plain.jsonl", tmp_path / "keyed.jsonl"
    plain.write_text('"bare string"\n\n{"text": "short"}\n')
    keyed.write_text('{"text": "short keyed", "user": "u1"}\n'
                     '{"task": "embed", "inputs": ["full"], "request_id": "f1", "user": "u2"}\n')
    # --no-check-models: the option defaults, --model "tiny" included, with no worker serving it
    # (its topics made here, as its worker would)
    tiny = broker_settings.with_overrides(model_name="tiny")
    ensure_topics(tiny, list(tiny.request_topics))
    common = ["--topic", broker_settings.requests_topic, "--task", "generate", "--tenant", "acme", "--model", "tiny",
              "--no-check-models"]
    for args in ([str(plain), *common], [str(keyed), *common, "--key-field", "user"]):
        result = CliRunner().invoke(produce, args, env=cli_env(broker_settings))
        assert result.exit_code == 0, result.output
    recs = {}
    for m in read_all(broker_settings, tiny.tier_topic("normal")):
        rec = decode(broker_settings, m)
        recs[rec["inputs"][0]] = (m.key(), rec)
    assert set(recs) == {"bare string", "short", "short keyed", "full"}
    for text in ("bare string", "short", "short keyed"):
        key, rec = recs[text]
        assert (rec["task"], rec["tenant"], rec["model"]) == ("GENERATE", "acme", "tiny")
    assert recs["bare string"][0] == recs["bare string"][1]["request_id"].encode()
    assert recs["short keyed"][0] == b"u1"
    assert recs["full"][0] == b"u2" and recs["full"][1]["task"] == "EMBED" and recs["full"][1]["model"] == "tiny"


def test_cli_reads_stdin_and_reports_invalid_lines_with_exit_1(broker_settings):
    lines = [
        '{"text": "ok 1"}',
        "{not json",
        '{"text": "ok 2"}',
        '{"task": "embed", "inputs": []}',
        '{"task": "translate", "inputs": ["x"]}',
        '"ok 3"',
        '{"text": "a", "colour": "red"}',
    ]
    result = CliRunner().invoke(produce, ["-", "--topic", broker_settings.requests_topic],
                                input="\n".join(lines) + "\n", env=cli_env(broker_settings))
    assert result.exit_code == 1, result.output
    for n, why in [(2, "not JSON"), (4, "inputs must be a non-empty list"), (5, "task must be one of"),
                   (7, "unknown field")]:
        assert re.search(rf"line {n}: \w+: .*{why}", result.output), result.output
    assert not re.search(r"line [136]:", result.output)
    assert "invalid: 4 line(s)" in result.output and "sent 3 requests" in result.output
    assert sum(end_offsets(broker_settings).values()) == 3


def test_cli_rate_limit_holds_a_small_run_to_the_rate(broker_settings, tmp_path):
    n, rate = 40, 20.0
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(f"text {i}") + "\n" for i in range(n)))
    burst = TokenBucket(rate).capacity
    started = time.monotonic()
    result = CliRunner().invoke(produce, [str(src), "--topic", broker_settings.requests_topic, "--rate", str(rate)],
                                env=cli_env(broker_settings))
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    # A lower bound only: the first `burst` go at once, the rest at most `rate` per second.
    assert elapsed >= (n - burst) / rate
    assert sum(end_offsets(broker_settings).values()) == n

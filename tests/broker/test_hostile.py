"""Hostile input: a corpus of bad records through a real worker, and fuzzing of decode+validation.

The worker never crashes, and every bad record becomes a dead letter with its reason (the
good ones interleaved with them are still answered). The limits come from the settings:
changing them changes the outcome.
"""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec
from inferlog.consumer.engine import Engine
from inferlog.consumer.runners import load_runner
from inferlog.consumer.records import Pending
from inferlog.errors import RecordError
from inferlog.request import build_request, now_ms
from inferlog.settings import default_model_path, load_settings
from support import account, limit_results_topic, output_count, produce_raw, running_worker, wait_until

CODEC = Codec()
MAX_RECORD = 1_000_000  # librdkafka's message.max.bytes default
BROKER_MAX = 1_048_588  # the broker's message.max.bytes default: a record batch of one record at most this


@pytest.fixture(scope="module")
def runner():
    return load_runner(default_model_path(), device="cpu")


def req(**over) -> dict:
    rec = build_request("embed", "a fine request")
    rec.update(over)
    return rec


def enc(rec: dict) -> bytes:
    return CODEC.encode(REQUEST, rec, trusted=True)  # trusted: the schema check would refuse the bad ones


def params(**p) -> dict:
    return {"max_new_tokens": None, "temperature": None, "top_p": None, "seed": None, **p}


def bad_enum_index() -> bytes:
    """A request whose task enum index (7) names no symbol: found as the one byte EMBED and CLASSIFY differ in."""
    base = req(request_id="x", task="EMBED")  # one record, so only the task differs (not created_at)
    a, b = enc(base), enc(dict(base, task="CLASSIFY"))
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    assert len(diff) == 1
    return a[: diff[0]] + bytes([7 * 2]) + a[diff[0] + 1 :]


def corpus(rng: random.Random, max_inputs: int) -> list[tuple[str, bytes | None, bytes | None, list, str]]:
    """(class, key, value, headers, expected reason or result status)."""
    valid = enc(req())
    out = []

    def add(cls, value, want, key=b"k", headers=None):
        out.append((cls, key, value, headers or [], want))

    for _ in range(25):  # random bytes: never a framing byte (those have their own classes below)
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        add("random bytes", bytes([rng.choice([b for b in range(256) if b not in (0x00, 0xC3)])]) + body, "UNDECODABLE")
    for _ in range(20):
        v = enc(req(inputs=[f"text {rng.random()}"]))
        add("truncated record", v[: rng.randrange(1, len(v))], "UNDECODABLE")
    add("C3 not followed by 01", b"\xc3\x02" + valid[2:], "UNDECODABLE")
    add("bad enum index", bad_enum_index(), "UNDECODABLE")
    add("trailing bytes", valid + b"\x00", "UNDECODABLE")
    add("valid Avro, wrong schema", CODEC.encode(RESULT, {
        "request_id": "r", "tenant": "t", "task": "EMBED", "status": "OK", "outputs": [], "error": None,
        "model": {"name": "m", "revision": None, "digest": None},
        "source": {"topic": "x", "partition": 0, "offset": 1},
        "timings": {"created_at": 0, "consumed_at": 0, "completed_at": 0, "infer_ms": 0.0},
        "batch": {"batch_id": "", "size": 0, "tokens": 0}, "worker_id": "w", "replay_run_id": None}), "WRONG_SCHEMA")
    add("valid Avro, wrong schema", CODEC.encode(DEADLETTER, {
        "source": {"topic": "x", "partition": 0, "offset": 1}, "reason": "R", "detail": "d", "worker_id": "w",
        "failed_at": 0}), "WRONG_SCHEMA")
    for _ in range(5):
        add("unknown fingerprint", b"\xc3\x01" + rng.randbytes(8) + valid[10:], "UNKNOWN_SCHEMA")
        add("unknown Confluent id", b"\x00" + rng.randbytes(4) + valid[10:], "UNKNOWN_SCHEMA")
    # huge: as close to the record size limit as the producer lets through
    add("huge input (~1 MB)", enc(req(inputs=["x" * (BROKER_MAX - 2048)])), "INPUT_TOO_LARGE")
    add("huge input (~1 MB)", enc(req(inputs=["word " * 12000] * 15)), "INPUT_TOO_LARGE")
    add("too many inputs", enc(req(inputs=["a"] * (max_inputs + 1))), "INPUT_TOO_LARGE")
    add("too many tokens", enc(req(inputs=["token " * 1000])), "INPUT_TOO_LARGE")
    for inputs in ([], [""], ["   "], ["ok", ""]):
        add("empty inputs", enc(req(inputs=inputs)), "INVALID_REQUEST")
    for p in (dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature=-1.0), dict(top_p=0.0),
              dict(top_p=1.5), dict(top_p=math.nan), dict(max_new_tokens=0), dict(max_new_tokens=10**6),
              dict(seed=-5)):
        add("NaN / out-of-range parameters", enc(req(parameters=params(**p))), "INVALID_REQUEST")
    for bad in (dict(request_id=""), dict(request_id="r" * 200), dict(created_at=-1), dict(priority=5000),
                dict(model=""), dict(tenant="t" * 300)):
        add("invalid fields", enc(req(**bad)), "INVALID_REQUEST")
    add("unknown task", enc(req(task="GENERATE")), "UNSUPPORTED_TASK")
    add("unknown task", enc(req(task="CLASSIFY")), "UNSUPPORTED_TASK")
    add("unknown model", enc(req(model="no-such-model")), "UNKNOWN_MODEL")
    add("null value", None, "UNDECODABLE")
    add("empty value", b"", "UNDECODABLE")
    add("oversized headers (bad record)", b"\x01junk", "UNDECODABLE",
        headers=[("h", b"v" * 200_000), ("empty", None), ("dup", b"1"), ("dup", b"2")])
    # well-formed records in hostile wrapping: answered, not dead-lettered
    add("null key (valid)", enc(req()), "OK", key=None)
    add("oversized headers (valid)", enc(req()), "OK", headers=[("h", b"v" * 200_000), ("n", None)])
    add("max_inputs exactly (valid)", enc(req(inputs=[f"t{i}" for i in range(max_inputs)])), "OK")
    add("past deadline", enc(req(deadline=now_ms() - 1000)), "EXPIRED")
    return out


def test_a_corpus_of_bad_records_all_dead_lettered_with_their_reason(broker_settings, runner):
    from confluent_kafka import Producer as KafkaProducer
    from inferlog.clients import confluent_config

    # a tighter max_inputs than the default: the worker must take its limits from the settings
    s = broker_settings.with_overrides(max_inputs=8)
    cases = corpus(random.Random(42), s.max_inputs)
    p = KafkaProducer(confluent_config(s, **{"enable.idempotence": True, "acks": "all",
                                             "message.max.bytes": MAX_RECORD + 100_000}))
    for i, (_, key, value, headers, _) in enumerate(cases):
        p.produce(s.tier_topic("normal"), value, key, headers=headers or None)
        p.produce(s.tier_topic('normal'), enc(req(inputs=[f"good neighbour {i}"])), None)  # shares its batches
    assert p.flush(60) == 0
    with running_worker(s, runner) as w:
        wait_until(lambda: output_count(s) >= 2 * len(cases), timeout=180, what="every offset answered")
        produce_raw(s, [(None, enc(req()))])  # and it still serves
        wait_until(lambda: output_count(s) >= 2 * len(cases) + 1, what="the worker to go on")
    acc = account(s)
    acc.assert_exactly_once()
    by = acc.by_source
    outcome = {}
    for r in acc.requests:
        kind, rec = by[(r.topic, r.partition, r.offset)][0]
        outcome.setdefault(r.value, []).append((kind, rec))
    for cls, _, value, _, want in cases:
        kind, rec = outcome[value][0]
        got = rec["reason"] if kind == "dead" else rec["status"]
        assert got == want, f"{cls}: {got} != {want} ({rec.get('detail') or rec.get('error')})"
        if kind == "dead" and len(value or b"") > 900_000:  # too big to carry: found by its source offset
            assert rec["value"] is None and "not carried" in rec["detail"]
        elif kind == "dead":
            assert rec["detail"] and rec["value"] == value
    dead = [c for c in cases if c[4] not in ("OK", "EXPIRED")]
    assert w.counts["dead_letters"] == len(dead)
    assert len(acc.dead_letters) == len(dead) and len(acc.results) == 2 * len(cases) + 1 - len(dead)


# -- fuzzing decode + validation as the worker does it --------------------------------------
@pytest.fixture(scope="module")
def decoder(runner):
    engine = Engine(load_settings(), runner)
    yield engine.decoder
    engine.close()


def decode_one(decoder, value) -> Pending:
    p = Pending("t", 0, 0, 1, None, value, None, now_ms())
    decoder([p])
    if p.error is None:
        assert p.request is not None and p.ids and all(p.ids)
    else:
        assert isinstance(p.error, RecordError) and p.error.reason and p.error.detail
    return p


VALID = [enc(build_request("embed", t)) for t in ("a", "hello world", "x" * 300)]


@hsettings(max_examples=300)
@given(st.binary(max_size=400) | st.sampled_from([b"\xc3\x01", b"\x00", b"\xc3\x01" + VALID[0][2:10]]).flatmap(
    lambda h: st.binary(max_size=300).map(lambda b: h + b)))
def test_fuzz_any_bytes_is_a_request_or_a_record_error(decoder, data):
    decode_one(decoder, data)


@hsettings(max_examples=300)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255),
                                                  st.sampled_from(["flip", "insert", "delete"])), min_size=1, max_size=6))
def test_fuzz_mutated_valid_records(decoder, value, edits):
    b = bytearray(value)
    for pos, byte, op in edits:
        i = pos % (len(b) + 1)
        if op == "insert":
            b.insert(i, byte)
        elif b and i < len(b):
            if op == "flip":
                b[i] ^= byte or 1
            else:
                del b[i]
    decode_one(decoder, bytes(b))


weird_float = st.floats(allow_nan=True, allow_infinity=True) | st.none()
weird_int = st.integers(-2**63, 2**63 - 1) | st.none()
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@hsettings(max_examples=300)
@given(st.fixed_dictionaries({
    "request_id": text, "tenant": text, "task": st.sampled_from(["EMBED", "GENERATE", "CLASSIFY"]),
    "model": st.none() | text, "inputs": st.lists(text, max_size=5),
    "parameters": st.fixed_dictionaries({"max_new_tokens": st.none() | st.integers(-2**31, 2**31 - 1),
                                         "temperature": weird_float, "top_p": weird_float, "seed": weird_int}),
    "created_at": st.integers(-2**63, 2**63 - 1), "priority": st.integers(-2**31, 2**31 - 1),
    "deadline": weird_int, "metadata": st.dictionaries(text, text, max_size=3)}))
def test_fuzz_schema_valid_records_with_any_values(decoder, rec):
    p = decode_one(decoder, enc(rec))
    if p.error is None:  # what passes is servable: finite, in range, non-empty
        r = p.request
        assert r.inputs and all(t.strip() for t in r.inputs) and r.task == "EMBED"
        t = r.parameters.temperature
        assert t is None or math.isfinite(t)


# -- limits are settings ---------------------------------------------------------------------
@pytest.mark.parametrize("override, rec, default_outcome, tightened", [
    (dict(max_inputs=2), req(inputs=["a", "b", "c"]), None, "INPUT_TOO_LARGE"),
    (dict(max_input_bytes=100), req(inputs=["y" * 150]), None, "INPUT_TOO_LARGE"),
    (dict(max_input_tokens=16), req(inputs=["word " * 40]), None, "INPUT_TOO_LARGE"),
    (dict(max_new_tokens_limit=10), req(parameters=params(max_new_tokens=50)), None, "INVALID_REQUEST"),
    (dict(max_inputs=100), req(inputs=["a"] * 80), "INPUT_TOO_LARGE", None),
])
def test_changing_a_limit_changes_the_outcome(runner, override, rec, default_outcome, tightened):
    def outcome(s):
        engine = Engine(s, runner)
        try:
            p = decode_one(engine.decoder, enc(rec))
        finally:
            engine.close()
        return None if p.error is None else p.error.reason

    assert outcome(load_settings()) == default_outcome
    assert outcome(load_settings(**override)) == tightened


# -- what a worker copies from a request into its outputs -----------------------------------
TRACE = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BIG = 1_000_000 - 4096  # a header as large as a record may be


def copied_cases() -> list[tuple[str, bytes, list, str, list]]:
    """(class, value, headers, expected reason or status, trace headers the output must carry)."""
    good, bad = enc(req()), b"\x01junk"
    return [
        ("1 MB traceparent (valid record)", good, [("traceparent", b"0" * BIG)], "OK", []),
        ("1 MB traceparent (undecodable record)", bad, [("traceparent", b"0" * BIG)], "UNDECODABLE", []),
        ("1 MB tracestate", good, [("traceparent", TRACE), ("tracestate", b"k=v," * (BIG // 4))], "OK",
         [("traceparent", TRACE)]),
        ("valid trace context", good, [("traceparent", TRACE), ("tracestate", b"vendor=abc")], "OK",
         [("traceparent", TRACE), ("tracestate", b"vendor=abc")]),
        ("valid trace context (undecodable record)", bad, [("traceparent", TRACE)], "UNDECODABLE",
         [("traceparent", TRACE)]),
        ("traceparent of another shape", good, [("traceparent", TRACE + b"-extra")], "OK", []),
        ("traceparent with a zero trace id", good, [("traceparent", b"00-" + b"0" * 32 + TRACE[35:])], "OK", []),
        ("traceparent, version ff", good, [("traceparent", b"ff" + TRACE[2:])], "OK", []),
        ("non-ASCII tracestate", good, [("traceparent", TRACE), ("tracestate", "k=\u00e9".encode())], "OK",
         [("traceparent", TRACE)]),
        ("null traceparent", good, [("traceparent", None)], "OK", []),
        ("1 MB header name (undecodable record)", bad, [("h" * (BIG // 2), b"v" * (BIG // 2))], "UNDECODABLE", []),
        # an id a dead letter copies from a record that did not validate: 600 kB of request_id
        ("600 kB request_id", enc(req(request_id="r" * 600_000)), [], "INVALID_REQUEST", []),
        ("600 kB tenant", enc(req(tenant="t" * 600_000)), [], "INVALID_REQUEST", []),
    ]


def test_copied_headers_and_ids_are_validated_and_bounded(broker_settings, runner):
    """Every case shares one partition (one key) with good records: a record whose copied
    headers or ids made its output unwritable would stop the partition for good."""
    from confluent_kafka import Producer as KafkaProducer
    from inferlog.clients import confluent_config
    from support import read_all

    cases = copied_cases()
    p = KafkaProducer(confluent_config(broker_settings, **{"enable.idempotence": True, "acks": "all",
                                                           "message.max.bytes": MAX_RECORD + 100_000}))
    for i, (_, value, headers, _, _) in enumerate(cases):
        p.produce(broker_settings.tier_topic("normal"), value, b"one-partition", headers=headers)
        p.produce(broker_settings.tier_topic('normal'), enc(req(inputs=[f"good neighbour {i}"])), b"one-partition")
    assert p.flush(60) == 0
    with running_worker(broker_settings, runner):
        wait_until(lambda: output_count(broker_settings) >= 2 * len(cases), timeout=180, what="every offset answered")
    acc = account(broker_settings)
    acc.assert_exactly_once()
    assert len({r.partition for r in acc.requests}) == 1
    headers_at = {}  # the output's Kafka headers by the source offset it answers
    for topic, dtype in ((broker_settings.model_results_topic, RESULT), (broker_settings.model_deadletter_topic, DEADLETTER)):
        for r in read_all(broker_settings, topic):
            rec = CODEC.decode(r.value, expect=dtype)
            headers_at[rec["source"]["offset"]] = [(k, v) for k, v in r.headers if k in ("traceparent", "tracestate")]
            assert len(r.value) + sum(len(k) + len(v or b"") for k, v in r.headers) < MAX_RECORD
    by = acc.by_source
    requests = sorted(acc.requests, key=lambda r: r.offset)  # in produce order: values repeat
    for i, (cls, _, _, want, trace) in enumerate(cases):
        case, neighbour = requests[2 * i], requests[2 * i + 1]
        kind, rec = by[(case.topic, case.partition, case.offset)][0]
        got = rec["reason"] if kind == "dead" else rec["status"]
        assert got == want, f"{cls}: {got} != {want} ({rec.get('detail') or rec.get('error')})"
        assert headers_at[case.offset] == trace, cls
        if kind == "dead":
            assert rec["request_id"] is None or len(rec["request_id"]) <= 256, cls
            assert rec["tenant"] is None or len(rec["tenant"]) <= 256, cls
        assert by[(neighbour.topic, neighbour.partition, neighbour.offset)][0][1]["status"] == "OK", cls


@pytest.mark.parametrize("delivery", ["exactly-once", "at-least-once"])
def test_an_output_the_broker_refuses_becomes_a_small_dead_letter(broker_settings, runner, delivery):
    """A results topic whose max.message.bytes is below an embedding result: the broker refuses
    the results (batch-mates and all); each refused one is tried alone, then written as an
    OUTPUT_UNWRITABLE dead letter, and the partition moves on."""
    limit_results_topic(broker_settings, 1024)
    s = broker_settings.with_overrides(delivery=delivery)
    produce_raw(s, [(b"k", enc(req(inputs=["one", "two", "three"]))) for _ in range(6)])
    with running_worker(s, runner) as w:
        wait_until(lambda: output_count(s) >= 6, timeout=120, what="every offset answered")
        assert w.counts["aborts"] == 0 or delivery == "exactly-once"
    acc = account(s)
    if delivery == "exactly-once":
        acc.assert_exactly_once()
    assert {(r.topic, r.partition, r.offset) for r in acc.requests} == set(acc.by_source)
    assert acc.reasons() == {"OUTPUT_UNWRITABLE": 6} and not acc.results
    assert all("MSG_SIZE_TOO_LARGE" in d["detail"] for d in acc.dead_letters)

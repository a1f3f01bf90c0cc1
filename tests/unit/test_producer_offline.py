"""The producer SDKs and `inferlog produce` without a broker: the CLI's token bucket and line
parsing, requests refused before anything is queued, and a cluster that cannot be reached (one
clear line, never a hang). tests/broker/test_producer.py runs them against a real broker."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inferlog.errors import InputTooLarge, InvalidRequest
from inferlog.producer.cli import TokenBucket, parse_line
from inferlog.producer.sync import Producer, ProduceError
from inferlog.settings import load_settings


# -- pure parts (no broker) ----------------------------------------------------------------
def test_token_bucket_paces_to_the_rate_after_the_burst():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(rate=100, burst=5, clock=lambda: now[0], sleep=sleep)
    for _ in range(105):
        bucket.acquire()
    # 5 free in the burst, the other 100 at 100/s: one second of sleeping, no more.
    assert now[0] == pytest.approx(1.0)
    assert len(slept) == 100


def test_token_bucket_refills_while_idle_but_not_beyond_the_burst():
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=2, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    bucket.acquire(), bucket.acquire()
    now[0] += 60.0  # a long pause earns only `burst` tokens
    start = now[0]
    for _ in range(12):
        bucket.acquire()
    assert now[0] - start == pytest.approx(1.0)


def test_parse_line_forms_defaults_and_key_field():
    defaults = {"task": "generate", "model": None, "tenant": "t1"}
    assert parse_line('"hello"', defaults) == {**defaults, "inputs": ["hello"]}
    assert parse_line('{"text": "hi", "user": "u7"}', defaults, key_field="user") == {
        **defaults, "inputs": ["hi"], "key": "u7"}
    full = {"task": "embed", "inputs": ["a", "b"], "tenant": "acme", "request_id": "r1", "priority": 3}
    assert parse_line(json.dumps(full), defaults) == {**defaults, **full}
    # a line's own key wins over --key-field; metadata can carry the key field
    assert parse_line('{"text": "x", "key": "k", "user": "u"}', defaults, key_field="user")["key"] == "k"
    assert parse_line('{"text": "x", "metadata": {"user": "m"}}', defaults, key_field="user")["key"] == "m"
    for bad, why in [("{nope", "not JSON"), ("[1, 2]", "JSON object or string"),
                     ('{"text": "a", "inputs": ["b"]}', "not both"), ('{"task": "embed"}', "missing"),
                     ('{"text": "a", "colour": 1}', "unknown field"), ('{"text": "a"}', "'user'")]:
        with pytest.raises(InvalidRequest, match=why):
            parse_line(bad, defaults, key_field="user" if why == "'user'" else None)


@pytest.fixture
def offline_producer():
    # No broker at this address: refusing a request must not need one.
    p = Producer(load_settings(bootstrap_servers="127.0.0.1:1"))
    yield p
    p.close(timeout=1)


@pytest.mark.parametrize("call, err", [
    pytest.param(lambda p: p.submit("embed", []), InvalidRequest, id="no-inputs"),
    pytest.param(lambda p: p.submit("translate", ["x"]), InvalidRequest, id="unknown-task"),
    pytest.param(lambda p: p.submit("embed", ["x"] * 65), InputTooLarge, id="too-many-inputs"),
    pytest.param(lambda p: p.submit("embed", ["x"], parameters={"temprature": 1}), InvalidRequest, id="param-typo"),
    pytest.param(lambda p: p.submit("embed", ["x"], metadata={"a": 1}), InvalidRequest, id="metadata-not-str"),
    pytest.param(lambda p: p.submit("embed", ["x"], deadline_ms="soon"), InvalidRequest, id="deadline-not-int"),
    pytest.param(lambda p: p.submit("embed", ["x"], key=42), InvalidRequest, id="key-not-str"),
    pytest.param(lambda p: p.submit_many([{"task": "embed", "inputs": ["ok"]}, {"task": "embed"}]), InvalidRequest,
                 id="many-missing-inputs"),
])
def test_invalid_requests_are_refused_before_anything_is_queued(offline_producer, call, err):
    with pytest.raises(err):
        call(offline_producer)
    assert len(offline_producer) == 0


# -- a cluster that cannot be reached: one clear line, never a hang ----------------------------
@pytest.mark.timeout(90)  # the defect was a hang (300 s, 1,911 ERROR lines): this test's own timeout bounds it
@pytest.mark.parametrize("server", ["refuses connections", "accepts and never answers"])
def test_cli_against_a_broker_that_does_not_answer_fails_fast_with_one_line(tmp_path, server):
    import socket

    src = tmp_path / "in.jsonl"
    src.write_text('"one"\n"two"\n')
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if server == "accepts and never answers":
            sock.listen(16)  # the kernel completes the handshake; nobody ever reads or writes
        port = sock.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "inferlog.cli", "produce", str(src), "--timeout", "3"],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "INFERLOG_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"})
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot reach Kafka at 127.0.0.1:{port} within 3s"), lines


@pytest.mark.timeout(60)
def test_sdk_flush_is_bounded_against_a_dead_broker():
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: every connection is refused
        p = Producer(load_settings(bootstrap_servers=f"127.0.0.1:{sock.getsockname()[1]}"))
        p.submit("embed", "queued while no broker answers")
        with pytest.raises(ProduceError) as e:
            p.flush(2)
        assert e.value.reason == "FLUSH_TIMEOUT" and "1 records still undelivered" in str(e.value)
        with pytest.raises(ProduceError, match="cannot reach Kafka"):
            p.connect(1)
        p.abandon()

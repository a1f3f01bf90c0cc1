"""The local broker, topic admin and the `inferlog kafka` CLI, against a real broker
(tests/unit/test_localkafka_offline.py: what needs none)."""
from __future__ import annotations

import time

import pytest
from click.testing import CliRunner
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from conftest import REPO, free_port, unique
from inferlog.cli import cli
from inferlog.clients import confluent_config
from inferlog.settings import load_settings
from inferlog.topics import TopicError, ensure_topics, partition_counts


def produce(settings, topic: str, n: int) -> set[tuple[bytes, bytes]]:
    p = Producer(confluent_config(settings, **{"enable.idempotence": True}))
    sent = {(f"k{i}".encode(), f"v{i}".encode()) for i in range(n)}
    for k, v in sent:
        p.produce(topic, v, key=k)
    assert p.flush(30) == 0
    return sent


def read_all(settings, topic: str, expect: int, timeout: float = 30) -> set[tuple[bytes, bytes]]:
    c = Consumer(confluent_config(settings, **{"group.id": unique("reader"), "enable.auto.commit": False}))
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        got: set[tuple[bytes, bytes]] = set()
        deadline = time.monotonic() + timeout
        while len(got) < expect and time.monotonic() < deadline:
            for m in c.consume(500, timeout=1):
                assert m.error() is None, m.error()
                got.add((m.key(), m.value()))
        return got
    finally:
        c.close()


def test_topics_are_created_idempotently(kafka):
    tag = unique("adm")
    s = load_settings(bootstrap_servers=kafka.bootstrap, requests_topic=f"{tag}.req",
                      high_priority_topic=f"{tag}.req.high", results_topic=f"{tag}.res", deadletter_topic=f"{tag}.dl",
                      models_topic=f"{tag}.models")
    names = [s.tier_topic("normal"), s.tier_topic("high"), s.model_results_topic, s.model_deadletter_topic]
    every = [*names, s.models_topic]

    assert ensure_topics(s, partitions=4) == dict.fromkeys(every, True)
    assert ensure_topics(s, partitions=4) == dict.fromkeys(every, False)
    # An existing topic is never re-partitioned, whatever the second call asks for.
    assert ensure_topics(s, partitions=8) == dict.fromkeys(every, False)
    # the model registry: one partition, compacted (inferlog/registry.py)
    assert partition_counts(s, every + ["no-such-topic"]) == {**dict.fromkeys(names, 4), s.models_topic: 1}
    admin = AdminClient(confluent_config(s))
    (configs,) = [f.result() for f in admin.describe_configs([ConfigResource("topic", s.models_topic)]).values()]
    assert configs["cleanup.policy"].value == "compact,delete"


def test_broker_settings_fixture_topics_exist(broker_settings):
    s = broker_settings
    counts = partition_counts(s, [s.tier_topic("normal"), s.model_results_topic, s.model_deadletter_topic])
    assert list(counts.values()) == [6, 6, 6]


def test_topic_errors_are_explained(kafka):
    if kafka.local is None:
        pytest.skip("replication limits depend on the external cluster's size")
    s = load_settings(bootstrap_servers=kafka.bootstrap)
    with pytest.raises(TopicError, match="cannot create topic"):
        ensure_topics(s, [unique("rf")], replication_factor=3)


def test_records_survive_a_broker_restart(kafka, topic_factory):
    s = load_settings(bootstrap_servers=kafka.bootstrap)
    topic = topic_factory(partitions=3)
    sent = produce(s, topic, 200)
    assert read_all(s, topic, len(sent)) == sent
    if kafka.local is None:
        pytest.skip("the broker is not ours to restart")

    assert kafka.local.stop(timeout=180), "the broker did not stop"  # a loaded machine stops it slowly
    assert not kafka.local.is_running()
    assert kafka.local.start(timeout=180) == kafka.bootstrap
    assert read_all(s, topic, len(sent)) == sent
    assert partition_counts(s, [topic]) == {topic: 3}


def test_cli_start_status_stop(tmp_path):
    # Its own broker (ports, data dir), so the session broker is left alone.
    version = load_settings().kafka_version
    port, cport = free_port(), free_port()
    common = ["--version", version, "--libs-dir", str(REPO / ".kafka" / "libs" / version),
              "--data-dir", str(tmp_path / "data"), "--port", str(port), "--controller-port", str(cport)]
    run = CliRunner().invoke

    def kafka(*args):
        return run(cli, ["kafka", *args], catch_exceptions=False)

    assert kafka("status", *common).exit_code == 1
    try:
        r = kafka("start", *common)
        assert r.exit_code == 0 and "started" in r.output, r.output
        r = kafka("start", *common)
        assert r.exit_code == 0 and "already running" in r.output
        r = kafka("status", *common)
        assert r.exit_code == 0 and "running: True" in r.output and f"127.0.0.1:{port}" in r.output

        r = kafka("topics", "--bootstrap-servers", f"127.0.0.1:{port}", "--partitions", "2")
        assert r.exit_code == 0 and r.output.count("created, 2 partitions") == 4, r.output
        r = kafka("topics", "--bootstrap-servers", f"127.0.0.1:{port}")
        assert r.output.count("exists, 2 partitions") == 4, r.output
    finally:
        r = kafka("stop", *common)
    assert "stopped" in r.output
    assert kafka("status", *common).exit_code == 1
    assert "not running" in kafka("stop", *common).output

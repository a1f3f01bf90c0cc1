"""The emitter's sweep on a healthy broker: what it leaves in the topics (one aborted record per
partition, which read_committed readers never see) and that commits go on as before.
tests/chaos/test_hanging.py shows the sweep ending transactions Kafka left hanging."""
from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from inferlog.clients import confluent_config
from inferlog.consumer.emit import SWEEP_HEADER, TransactionalEmitter
from inferlog.consumer.records import Out
from inferlog.topics import partition_counts
from support import read_all


def test_a_sweep_leaves_one_aborted_record_per_partition_and_commits_go_on(broker_settings):
    s = broker_settings
    consumer = Consumer(confluent_config(s, **{"group.id": s.worker_group, "enable.auto.commit": False,
                                               "isolation.level": "read_committed"}))
    emitter = TransactionalEmitter(s, consumer)  # sweeps at start
    try:
        emitter.commit([Out(s.model_results_topic, b"k", b"an answer", [], "OK", source=(s.tier_topic("normal"), 0, 0))],
                       {(s.tier_topic("normal"), 0): 1}, consumer.consumer_group_metadata())
        committed = consumer.committed([TopicPartition(s.tier_topic("normal"), 0)], timeout=30)
    finally:
        emitter.close()
        consumer.close()
    counts = partition_counts(s, [s.model_results_topic, s.model_deadletter_topic])
    for topic in (s.model_results_topic, s.model_deadletter_topic):
        raw = read_all(s, topic, isolation="read_uncommitted")
        swept = [r for r in raw if r.key == SWEEP_HEADER.encode()]
        assert sorted(r.partition for r in swept) == list(range(counts[topic]))
        assert all(r.value == b"" and (SWEEP_HEADER, b"1") in r.headers for r in swept)
        seen = read_all(s, topic)
        assert not [r for r in seen if r.key == SWEEP_HEADER.encode()]
    assert [r.value for r in read_all(s, s.model_results_topic)] == [b"an answer"]
    assert committed[0].offset == 1

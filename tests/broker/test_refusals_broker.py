"""One commit through `TransactionalEmitter` on a real broker whose results topic refuses an
output (consumer/emit.py `Refusals`): the refused one becomes a small dead letter, the rest commit.
tests/unit/test_refusals.py checks `Refusals` alone; tests/broker/test_hostile.py sends every result
of a worker over a topic's limit, here one output among good ones, straight through the emitter.
"""
from __future__ import annotations

import os

from confluent_kafka import Consumer, TopicPartition

from inferlog.clients import confluent_config
from inferlog.codec import DEADLETTER, Codec
from inferlog.consumer.emit import TransactionalEmitter
from inferlog.consumer.models import ModelInfo
from inferlog.consumer.records import Out
from inferlog.consumer.results import ResultBuilder
from support import limit_results_topic, read_all


def test_an_output_over_the_topics_limit_becomes_a_dead_letter_and_the_rest_commit(broker_settings):
    """The results topic takes records of at most 1 kB. One commit carries five small results
    and, among them on the same partition (one batch), one of 4 kB: the committed results are
    the five, the big one is one small OUTPUT_UNWRITABLE dead letter naming its source and the
    refusal, nothing is written twice, and the offsets are committed with them."""
    limit_results_topic(broker_settings, 1024)
    codec = Codec.from_settings(broker_settings)
    builder = ResultBuilder(codec, broker_settings, ModelInfo("m", None, None))
    req_topic = broker_settings.tier_topic("normal")

    def result(offset: int, size: int) -> Out:  # random bytes: lz4 cannot shrink them under the limit
        return Out(broker_settings.model_results_topic, b"one-key", os.urandom(size), [], "OK", source=(req_topic, 0, offset))

    outputs = [result(0, 100), result(1, 100), result(2, 4000), result(3, 100), result(4, 100), result(5, 100)]
    small = [o.value for i, o in enumerate(outputs) if i != 2]
    consumer = Consumer(confluent_config(broker_settings, **{
        "group.id": broker_settings.worker_group, "enable.auto.commit": False, "isolation.level": "read_committed"}))
    emitter = TransactionalEmitter(broker_settings, consumer, fallback=builder.unwritable)
    try:
        emitter.commit(list(outputs), {(req_topic, 0): 6, (req_topic, 1): 3}, consumer.consumer_group_metadata())
        committed = consumer.committed([TopicPartition(req_topic, 0), TopicPartition(req_topic, 1)], timeout=30)
    finally:
        emitter.close()
        consumer.close()
    results = read_all(broker_settings, broker_settings.model_results_topic)
    assert sorted(r.value for r in results) == sorted(small)  # each once: aborted attempts are invisible
    dead = [codec.decode(r.value, expect=DEADLETTER)
            for r in read_all(broker_settings, broker_settings.model_deadletter_topic)]
    assert len(dead) == 1
    d = dead[0]
    assert d["reason"] == "OUTPUT_UNWRITABLE" and d["source"] == {"topic": req_topic, "partition": 0, "offset": 2}
    assert "MSG_SIZE_TOO_LARGE" in d["detail"] and d["value"] is None
    assert [(tp.partition, tp.offset) for tp in committed] == [(0, 6), (1, 3)]

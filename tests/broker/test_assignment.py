"""Where a partition starts when a member gets it: the group's committed offset, read stable,
never a reset policy, under both group protocols (issue 24).

The scenario of tests/repro/unstable_offsets.py, through the worker: the group has committed 50
on every partition, and a transaction left open holds offsets 80 for partitions 0 and 1 (a
member killed mid-commit, restarted under another id, so nobody fences it). One worker joins,
a second joins 4 s later, then the transaction is aborted. librdkafka 2.16.0 alone starts
partitions 0 and 1 at INVALID and then from `earliest` (3 of 3 runs under KIP-848): offsets
0-49, committed work, answered again. The worker must start every partition at 50."""
from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from inferlog.clients import confluent_config, group_protocol_config
from inferlog.codec import REQUEST, Codec
from inferlog.consumer.runners import load_runner
from inferlog.request import build_request
from inferlog.consumer.worker import Worker
from support import account, output_count, wait_until
from tinymodels import tiny_bert_classifier_dir  # noqa: F401  (fixture)

PER_PARTITION, COMMITTED, OPEN = 40, 20, 30


@pytest.fixture(scope="module")
def classifier(tiny_bert_classifier_dir):
    return load_runner(str(tiny_bert_classifier_dir), device="cpu")


@pytest.mark.parametrize("protocol", ["consumer", "classic"])
def test_a_partition_held_by_an_open_transaction_starts_at_its_committed_offset(broker_settings, classifier, protocol):
    s = broker_settings.with_overrides(group_protocol=protocol, session_timeout_ms=6000, transaction_timeout_ms=20000)
    codec = Codec.from_settings(s)
    p = Producer(confluent_config(s, **{"enable.idempotence": True}))
    for part in range(s.partitions):
        for i in range(PER_PARTITION):
            p.produce(s.tier_topic('normal'), codec.encode(REQUEST, build_request("classify", f"record {i} of {part}")),
                      partition=part)
    assert p.flush(30) == 0

    # a member of the group commits COMMITTED everywhere, then leaves a transaction open
    # holding OPEN for partitions 0 and 1, and goes away
    a = Consumer(confluent_config(s, **{"group.id": s.worker_group, "enable.auto.commit": False,
                                        "isolation.level": "read_committed", **group_protocol_config(s)}))
    a.subscribe([s.tier_topic("normal")])
    wait_until(lambda: a.poll(0.2) is None and a.assignment(), timeout=60, what="the first member's assignment")
    txn = Producer(confluent_config(s, **{"transactional.id": f"{s.worker_group}-gone", "transaction.timeout.ms": 60000}))
    txn.init_transactions(30)
    txn.begin_transaction()
    txn.send_offsets_to_transaction([TopicPartition(s.tier_topic("normal"), q, COMMITTED) for q in range(s.partitions)],
                                    a.consumer_group_metadata(), 30)
    txn.commit_transaction(30)
    txn.begin_transaction()
    txn.send_offsets_to_transaction([TopicPartition(s.tier_topic("normal"), q, OPEN) for q in (0, 1)],
                                    a.consumer_group_metadata(), 30)
    a.close()

    expected = s.partitions * (PER_PARTITION - COMMITTED)
    # the first worker waits for the open transaction; the second joins meanwhile (the
    # assignment changes while the first asks); the transaction ends 20 s in (the reproduction
    # sees partitions 0 and 1 read from 0 while it is still open)
    threading.Timer(20.0, lambda: txn.abort_transaction(30)).start()
    workers = [Worker(s, classifier)]
    threads = [threading.Thread(target=workers[0].run, daemon=True)]
    threads[0].start()
    time.sleep(4)
    workers.append(Worker(s.with_overrides(worker_id=f"{s.worker_id}-b"), classifier))
    threads.append(threading.Thread(target=workers[1].run, daemon=True))
    threads[1].start()
    try:
        wait_until(lambda: output_count(s) >= expected, timeout=120, what=f"{expected} outputs")
        time.sleep(2)  # a partition wrongly started at 0 would answer more meanwhile
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(120)

    acc = account(s)
    answered = sorted(acc.by_source)
    below = [src for src in answered if src[2] < COMMITTED]
    assert not below, f"committed work answered again (started from a reset policy): {below[:5]}"
    assert len(answered) == expected, f"{len(answered)} offsets answered, {expected} expected"
    assert all(len(v) == 1 for v in acc.by_source.values())

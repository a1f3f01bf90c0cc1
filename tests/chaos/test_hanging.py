"""Transactions Kafka left hanging, and the sweep that ends them.

On one node a broker that stops (or comes back) while a transaction's markers are being written
has no leader for its partitions at that moment, and Kafka skips a marker whose partition has no
leader ("likely deleted already") yet completes the transaction: its offsets stay pending and its
records hold the last stable offset back, for good. The chaos suite's broker test left two such
data dirs behind (tests/data/hanging-transactions.tgz); here each is started again, shown still
hanging after init_transactions of the same id, and ended by a worker's emitter started under
that id (consumer/emit.py, _sweep)."""
from __future__ import annotations

import gc
import tarfile
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, IsolationLevel, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from conftest import REPO, free_port
from inferlog.committed import committed_offsets, group_reader, last_committed
from inferlog.consumer.emit import TransactionalEmitter
from inferlog.localkafka import LocalKafka
from inferlog.settings import load_settings
from support import account, wait_until

DATA = Path(__file__).parent.parent / "data" / "hanging-transactions.tgz"
# each data dir: the topics' prefix, and what a transaction of worker w0 left hanging
CASES = {
    "offsets": ("bounce-12c72a3a33", ["offsets 0", "offsets 1", "offsets 2"]),  # skipped at a stop
    "results": ("bounce-c000be101a", ["results 3", "results 4"]),  # skipped as the broker came back
}


# One admin client per broker for the test process (it lists log ends: ListOffsets only)
ADMINS: dict[str, AdminClient] = {}


def admin_of(s) -> AdminClient:
    if s.bootstrap_servers not in ADMINS:
        ADMINS[s.bootstrap_servers] = AdminClient({"bootstrap.servers": s.bootstrap_servers})
    return ADMINS[s.bootstrap_servers]


def hung(s) -> list[str]:
    """What is stuck: request partitions whose offsets never read stable, result partitions
    whose last stable offset stops short of their end. Group offsets are read by a consumer of
    the group, never the admin API (it crashes on a coordinator error: inferlog/committed.py)."""
    admin = admin_of(s)
    stable = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": s.worker_group,
                       "isolation.level": "read_committed"})  # asks with require_stable
    stuck = []
    try:
        for p in range(6):
            try:  # librdkafka asks again while the offsets are unstable, until its timeout
                got = stable.committed([TopicPartition(s.tier_topic("normal"), p)], timeout=3)
                if got[0].error:
                    stuck.append(f"offsets {p}")
            except KafkaException:
                stuck.append(f"offsets {p}")
    finally:
        stable.close()
    res = [TopicPartition(s.results_topic, p) for p in range(6)]
    end, lso = ends(admin, res, IsolationLevel.READ_UNCOMMITTED), ends(admin, res, IsolationLevel.READ_COMMITTED)
    return stuck + [f"results {tp.partition}" for tp in res if lso[tp] < end[tp]]


def ends(admin, tps, level, tries: int = 10) -> dict:
    """Each partition's end for readers of `level`, asked again while the broker settles."""
    for attempt in range(tries):
        try:
            got = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, isolation_level=level)
            return {tp: f.result().offset for tp, f in got.items()}
        except KafkaException:
            if attempt == tries - 1:
                raise
            time.sleep(1.0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_worker_restarted_under_its_id_ends_what_kafka_left_hanging(tmp_path, case):
    prefix, hanging = CASES[case]
    with tarfile.open(DATA) as tar:
        tar.extractall(tmp_path, members=[m for m in tar.getmembers() if m.name.startswith(case)], filter="data")
    version = load_settings().kafka_version
    broker = LocalKafka(libs_dir=REPO / ".kafka" / "libs" / version, data_dir=tmp_path / case, port=free_port(),
                        controller_port=free_port(), version=version)
    broker.fetch()
    broker.start(timeout=180)
    try:
        s = load_settings(bootstrap_servers=broker.bootstrap, requests_topic=f"{prefix}.requests",
                          high_priority_topic=f"{prefix}.requests.high", results_topic=f"{prefix}.results",
                          deadletter_topic=f"{prefix}.deadletter", group_id=f"{prefix}.workers", worker_id="w0",
                          topic_layout="shared")  # captured before models had topics of their own
        txn_id = f"inferlog-{s.worker_group}-{s.worker_id}"  # the emitter's
        wait_until(lambda: hung(s) == hanging, timeout=60, what=f"{hanging} hanging")
        # init_transactions alone (a successor under the same id) does not end it: Kafka counts
        # that transaction as complete, and keeps its offsets pending and its records open
        successor = Producer({"bootstrap.servers": s.bootstrap_servers, "transactional.id": txn_id})
        successor.init_transactions(30)
        time.sleep(3.0)
        assert hung(s) == hanging
        del successor  # freed here, while its broker runs (the emitter's init fences it anyway)
        tps = [TopicPartition(s.tier_topic("normal"), p) for p in range(6)]
        reader = group_reader(s, s.worker_group)
        try:
            before = last_committed(reader, tps, patience=30)
        finally:
            reader.close()
        consumer = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": s.worker_group})
        try:
            TransactionalEmitter(s, consumer).close()  # init_transactions, then the sweep
        finally:
            consumer.close()
        wait_until(lambda: not hung(s), timeout=30, what="the sweep to end it")
        # aborted: the offsets are those committed before it, and its records stay invisible
        reader = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": s.worker_group,
                           "isolation.level": "read_committed"})
        try:
            after = committed_offsets(reader, tps + [TopicPartition(s.tier_topic("high"), p) for p in range(6)],
                                      patience=30)
        finally:
            reader.close()
        assert [tp.offset for tp in after[:6]] == [tp.offset for tp in before]
        # every request the group counts as done has one answer, and none has two
        done = {(tp.topic, tp.partition): tp.offset for tp in after}
        acc = account(s)
        assert {k: len(v) for k, v in acc.by_source.items() if len(v) > 1} == {}
        lost = [(r.topic, r.partition, r.offset) for r in acc.requests
                if r.offset < done[(r.topic, r.partition)] and (r.topic, r.partition, r.offset) not in acc.by_source]
        assert lost == []
    finally:
        gc.collect()  # every client of this broker freed while it still runs
        broker.stop()

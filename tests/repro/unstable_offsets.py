"""Minimal reproduction: librdkafka starts a partition at INVALID (then auto.offset.reset) when its
committed offset is unstable, i.e. a transaction that carries offsets for it is still open.

KIP-447 says a read_committed consumer asks for stable offsets (OffsetFetch require_stable) and
retries while the broker answers UNSTABLE_OFFSET_COMMIT. librdkafka does (librdkafka#3265), except
on a path where the assignment changes while an OffsetFetch is in flight; there it logs

    DUMP_PND ... offset INVALID: error: Broker: There are unstable offsets that need to be cleared
    SRVPEND  ... Starting pending assigned partition ... at offset INVALID

and the partition then starts from the reset policy: here `earliest`, so from offset 0, redoing
what the group had committed. inferlog's worker does not depend on it (consumer/assignment.py):
it reads the committed offsets itself, waits while they are unstable and assigns explicit ones.

Steps (no inferlog code involved, only confluent-kafka and a broker):
 1. a topic of 4 partitions, 100 records each;
 2. member A joins; a transactional producer commits the group's offsets at 50 on all four with
    A's group metadata, then opens a second transaction that sends offsets 80 for partitions 0
    and 1 and leaves it open;
 3. A closes;
 4. member B subscribes (auto.offset.reset=earliest, read_committed): it must wait for the open
    transaction before it starts partitions 0 and 1;
 5. 4 s later member C joins (the assignment changes while B's OffsetFetch is retried).
Expected: every partition starts at 50 (or 80 once the transaction ends). The bug: 0 and 1 at 0.

    .venv/bin/python tests/repro/unstable_offsets.py [--bootstrap-servers HOST:PORT]
        [--protocol consumer|classic] [--runs 3]

Exit 1 when any run reproduces the bug, 0 otherwise; one line per run and the library versions.
Without --bootstrap-servers it starts a throwaway local broker (inferlog's LocalKafka).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import confluent_kafka
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

PARTITIONS, RECORDS = 4, 100


def member(bootstrap: str, group: str, protocol: str, name: str) -> Consumer:
    conf = {"bootstrap.servers": bootstrap, "group.id": group, "client.id": name, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "isolation.level": "read_committed"}
    if protocol == "consumer":
        conf["group.protocol"] = "consumer"
    else:
        conf.update({"partition.assignment.strategy": "cooperative-sticky", "session.timeout.ms": 6000})
    return Consumer(conf)


def first_offsets(consumer: Consumer, seconds: float, found: dict) -> None:
    """Poll for `seconds`, noting the first offset read from each partition."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m = consumer.poll(0.2)
        if m is not None and m.error() is None:
            found.setdefault(m.partition(), m.offset())


def run_once(bootstrap: str, protocol: str) -> dict[int, int]:
    tag = uuid.uuid4().hex[:8]
    topic, group = f"repro-{tag}", f"repro-{tag}.group"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
    p = Producer({"bootstrap.servers": bootstrap})
    for part in range(PARTITIONS):
        for i in range(RECORDS):
            p.produce(topic, f"{part}-{i}".encode(), partition=part)
    assert p.flush(30) == 0

    a = member(bootstrap, group, protocol, "A")
    a.subscribe([topic])
    deadline = time.monotonic() + 60
    while not a.assignment() and time.monotonic() < deadline:
        a.poll(0.2)
    txn = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"repro-{tag}",
                    "transaction.timeout.ms": 20000})
    txn.init_transactions(30)
    txn.begin_transaction()
    txn.send_offsets_to_transaction([TopicPartition(topic, q, 50) for q in range(PARTITIONS)],
                                    a.consumer_group_metadata(), 30)
    txn.commit_transaction(30)
    txn.begin_transaction()  # left open: offsets 80 for partitions 0 and 1 are unstable
    txn.send_offsets_to_transaction([TopicPartition(topic, q, 80) for q in (0, 1)], a.consumer_group_metadata(), 30)
    a.close()

    found: dict[int, int] = {}
    b, c = member(bootstrap, group, protocol, "B"), member(bootstrap, group, protocol, "C")
    b.subscribe([topic])
    tb = threading.Thread(target=first_offsets, args=(b, 16, found))
    tb.start()
    time.sleep(4)
    c.subscribe([topic])
    first_offsets(c, 12, found)
    tb.join()
    txn.abort_transaction(30)
    b.close()
    c.close()
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap-servers")
    ap.add_argument("--protocol", choices=["consumer", "classic"], default="consumer")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"confluent-kafka {confluent_kafka.__version__}, librdkafka {confluent_kafka.libversion()[0]}, "
          f"group.protocol={args.protocol}")
    local = None
    bootstrap = args.bootstrap_servers
    if not bootstrap:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from inferlog.localkafka import LocalKafka
        from inferlog.settings import load_settings

        from tests.conftest import free_port  # noqa: E402

        version = load_settings().kafka_version
        local = LocalKafka(libs_dir=Path(__file__).resolve().parents[2] / ".kafka" / "libs" / version,
                           data_dir=Path(tempfile.mkdtemp(prefix="repro-kafka-")), port=free_port(),
                           controller_port=free_port(), version=version)
        local.fetch()
        bootstrap = local.start()
        print(f"Apache Kafka {version} (local, {bootstrap})")
    bad = 0
    try:
        for i in range(args.runs):
            found = run_once(bootstrap, args.protocol)
            wrong = {q: off for q, off in found.items() if off < 50}
            bad += bool(wrong)
            print(f"run {i + 1}: first offsets {dict(sorted(found.items()))} -> "
                  f"{'BUG: started below the committed offset ' + str(wrong) if wrong else 'ok'}")
    finally:
        if local is not None:
            local.stop()
    print(f"{bad} of {args.runs} runs reproduced it")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Reading a group's committed offsets while the broker is killed and comes back.

Every driver reads a group's committed offsets besides its own consumer's: the worker's lag
gauge (consumer/metrics.py LagSampler), its sweep (consumer/emit.py), a shared replay's progress
(replay/shared.py). librdkafka's admin API for that (ListConsumerGroupOffsets) kills the process
when the coordinator answers an error, as a broker that restarts does: SIGSEGV or a failed
assertion (it ended the suite's CI run once). inferlog reads through a consumer of the group
(inferlog/committed.py group_reader). Here a process runs those readers in a loop while its
broker is killed with SIGKILL and started again, and must live through it and read true figures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from support import wait_until

from .harness import own_topics

# the readers in a loop, as the worker and replay run them: a line of JSON per read that worked
PROBE = r"""
import json, sys, time
from prometheus_client import CollectorRegistry, Gauge
from confluent_kafka import TopicPartition
from inferlog.committed import group_reader, last_committed, OffsetsUnreadable
from inferlog.consumer.metrics import LagSampler
from inferlog.settings import load_settings

s = load_settings()
want = [(t, p) for t in s.request_topics for p in range(s.partitions)]
registry = CollectorRegistry()
gauge = Gauge("lag", "lag", ["topic", "partition"], registry=registry)
sampler = LagSampler(s, gauge, timeout=2.0)
reader = group_reader(s, s.worker_group)
while True:
    sampler.sample(want)
    try:
        got = last_committed(reader, [TopicPartition(t, p) for t, p in want], timeout=2.0)
    except OffsetsUnreadable:
        time.sleep(0.1)
        continue
    lag = {f"{t}/{p}": registry.get_sample_value("lag", {"topic": t, "partition": str(p)}) for t, p in want}
    print(json.dumps({"committed": {f"{tp.topic}/{tp.partition}": tp.offset for tp in got}, "lag": lag}), flush=True)
    time.sleep(0.1)
"""


def test_group_offsets_read_on_through_broker_sigkills(own_broker, tmp_path):
    s = own_topics(own_broker.bootstrap, "reads")  # six partitions a tier
    # a backlog on both tiers, and the group's offsets committed part of the way on each partition
    producer = Producer({"bootstrap.servers": s.bootstrap_servers})
    for topic in s.request_topics:
        for p in range(s.partitions):
            for i in range(5):
                producer.produce(topic, value=b"x%d" % i, partition=p)
    assert producer.flush(30) == 0
    offsets = [TopicPartition(t, p, 1 + p % 3) for t in s.request_topics for p in range(s.partitions)]
    c = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": s.worker_group})
    c.commit(offsets=offsets, asynchronous=False)
    c.close()
    committed = {f"{tp.topic}/{tp.partition}": tp.offset for tp in offsets}
    lag = {k: 5.0 - v for k, v in committed.items()}

    def sampled() -> bool:
        """The committed offsets read true, and a lag sample of every partition no more than the
        log holds: a broker killed before it checkpointed its high watermark starts again with
        an older one, until the next write moves it to the log end."""
        last = reads[-1] if reads else {}
        return last.get("committed") == committed and all(
            (n := last["lag"].get(k)) is not None and 0 <= n <= most for k, most in lag.items())

    env = dict(os.environ, INFERLOG_BOOTSTRAP_SERVERS=s.bootstrap_servers, INFERLOG_REQUESTS_TOPIC=s.requests_topic,
               INFERLOG_HIGH_PRIORITY_TOPIC=s.high_priority_topic, INFERLOG_GROUP_ID=s.group_id,
               INFERLOG_SERVED_MODEL_NAME=s.served_name, INFERLOG_PARTITIONS="6")
    log = tmp_path / "readers.log"  # librdkafka's lines, and how the process ended if it did
    probe = subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                             stderr=log.open("w"), text=True)
    reads: list[dict] = []
    threading.Thread(target=lambda: [reads.append(json.loads(line)) for line in probe.stdout], daemon=True).start()

    def read_true() -> bool:
        return bool(reads) and reads[-1] == {"committed": committed, "lag": lag}

    def last() -> str:
        return (f"{len(reads)} reads, the last: {reads[-1] if reads else None}; the readers' exit: {probe.poll()}; "
                f"their log ends:\n{log.read_text()[-2000:]}")

    try:
        wait_until(read_true, timeout=60, what="the readers' first true figures")
        for kill in range(3):
            os.kill(own_broker.pid(), signal.SIGKILL)
            time.sleep(1.0)  # the readers ask meanwhile: connections refused, then a coordinator loading
            own_broker.start(timeout=180)
            assert probe.poll() is None, f"the readers died at kill {kill}: {last()}"
            seen = len(reads)
            try:
                wait_until(lambda: len(reads) > seen and sampled(), timeout=90, what=f"true figures after kill {kill}")
            except TimeoutError as e:
                raise AssertionError(f"{e}; {last()}") from None
        # one more record on every partition: the high watermark is the log end again, and the
        # gauge follows it exactly
        for topic in s.request_topics:
            for p in range(s.partitions):
                producer.produce(topic, value=b"one more", partition=p)
        assert producer.flush(60) == 0
        lag.update({k: v + 1 for k, v in lag.items()})
        try:
            wait_until(read_true, timeout=90, what="the gauge at the log end after the kills")
        except TimeoutError as e:
            raise AssertionError(f"{e}; {last()}") from None
        assert probe.poll() is None
    finally:
        probe.send_signal(signal.SIGKILL)
        probe.wait(10)

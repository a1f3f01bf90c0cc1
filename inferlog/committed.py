"""A consumer group's committed offsets, read the one safe way, for every driver (worker, replay).

Where a partition starts is never left to librdkafka's own committed-offset fetch. When a
transaction of the previous owner still holds the partition's offsets (a worker killed with
SIGKILL, whose transaction stays open until a successor with its transactional.id fences it or
transaction.timeout.ms passes), the broker answers UNSTABLE_OFFSET_COMMIT and KIP-447 asks the
client to wait. librdkafka 2.16.0 does not always: when the assignment changes while it waits, it
starts the partition at INVALID and so from auto.offset.reset, redoing committed work from the
start of the partition (tests/repro/unstable_offsets.py reproduces it). So the drivers read the
committed offsets themselves, waiting while they are unstable, and assign explicit positions;
their consumers run with auto.offset.reset=error, so no partition ever starts from a policy.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, ConsumerGroupTopicPartitions, KafkaException, TopicPartition

from .errors import OffsetsUnreadable  # raised here; a typed error of its own (errors.py)

log = logging.getLogger(__name__)

# the longest a read waits by default: an open transaction lasts until transaction.timeout.ms,
# and the coordinator looks for timed-out ones every 10 s
PATIENCE_S = 180.0


def committed_offsets(consumer, tps: list, patience: float = PATIENCE_S) -> list[TopicPartition]:
    """The group's committed offsets of `tps` (TopicPartitions, OFFSET_INVALID where it has none),
    read stable (read_committed consumers ask with require_stable) and asked again while any is
    unstable or unreadable: an open transaction settles first, a coordinator loads after a restart."""
    if not tps:
        return []
    return _asked_again(lambda: consumer.committed(tps, timeout=10), patience,
                        "an open transaction of the previous owner settles first")


def last_committed(admin, group: str, tps: list, timeout: float = 10.0, patience: float = 0.0) -> list:
    """The group's committed offsets of `tps` as of the last committed transactions, without
    waiting for open ones (require_stable off): never ahead of what is committed, so a figure of
    progress, never a place to start reading from."""

    def read() -> list:
        fut = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)],
                                                require_stable=False, request_timeout=timeout)[group]
        return fut.result(timeout=timeout + 5).topic_partitions

    return _asked_again(read, patience, "the coordinator is away")


def start_positions(committed: list[TopicPartition]) -> list[TopicPartition]:
    """Explicit positions to assign or seek to: the committed offset, or the beginning of the
    partition where the group has committed nothing yet (a new group; read without error, so known)."""
    return [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset != OFFSET_INVALID else OFFSET_BEGINNING)
            for tp in committed]


def _asked_again(read: Callable[[], list], patience: float, why_wait: str) -> list:
    """`read()` until no partition has an error, for `patience` seconds; then OffsetsUnreadable."""
    deadline = time.monotonic() + patience
    said = 0.0
    while True:
        try:
            got = read()
            why = next((tp.error for tp in got if tp.error), None)
            if why is None:
                return got
        except (KafkaException, TimeoutError) as e:  # TimeoutError: an admin future
            why = e
        now = time.monotonic()
        if now > deadline:
            raise OffsetsUnreadable(f"cannot read the committed offsets after {patience:.0f}s: {why}")
        if now - said >= 10.0:  # one line every 10 s while waiting, not one a second
            said = now
            log.warning("committed offsets not readable yet (%s): %s; asking again", why, why_wait)
        time.sleep(0.5)

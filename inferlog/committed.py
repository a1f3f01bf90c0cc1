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

Every read here goes through a consumer of the group, never librdkafka's admin OffsetFetch
(ListConsumerGroupOffsets): an admin client has no consumer group of its own, and librdkafka
2.16.0 takes that null group on a coordinator error (NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE,
what a coordinator that moves or a broker that restarts answers) to re-query the coordinator:
the process dies of SIGSEGV or a failed assertion (librdkafka issue 5040; tests/chaos/
test_group_reads.py kills a broker under both kinds of reader).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, Consumer, KafkaException, TopicPartition

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


def group_reader(settings, group: str) -> Consumer:
    """A consumer of `group` that never joins it (it subscribes to nothing), for last_committed:
    read_uncommitted, so its reads do not wait for open transactions. Close it when done."""
    from .clients import confluent_config

    return Consumer(confluent_config(settings, **{"group.id": group, "isolation.level": "read_uncommitted",
                                                  "enable.auto.commit": False}))


def last_committed(reader: Consumer, tps: list, timeout: float = 10.0, patience: float = 0.0) -> list:
    """The committed offsets of `reader`'s group (a group_reader) as of its last committed
    transactions, without waiting for open ones (require_stable off): never ahead of what is
    committed, so a figure of progress, never a place to start reading from."""
    if not tps:
        return []
    return _asked_again(lambda: reader.committed(tps, timeout=timeout), patience, "the coordinator is away")


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
        except KafkaException as e:
            why = e
        now = time.monotonic()
        if now > deadline:
            raise OffsetsUnreadable(f"cannot read the committed offsets after {patience:.0f}s: {why}")
        if now - said >= 10.0:  # one line every 10 s while waiting, not one a second
            said = now
            log.warning("committed offsets not readable yet (%s): %s; asking again", why, why_wait)
        time.sleep(0.5)

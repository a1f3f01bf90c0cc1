"""A shared replay's member reader (replay/shared.py GroupReader) against a fake consumer: the
worker's back-pressure on its partitions (a partition assigned while its tier is paused starts
paused; the held records of partitions given up are dropped) and when it finishes a partition
whose last offsets are transaction markers."""
from __future__ import annotations

import time

from confluent_kafka import TopicPartition

from inferlog.consumer.flow import FlowControl
from inferlog.replay.runner import Progress
from inferlog.replay.shared import GroupReader
from inferlog.replay.window import PartitionRange, Window
from inferlog.settings import Settings
from support import Fetched as Msg

S = Settings(max_in_flight=2)
NORMAL, HIGH = S.tier_topic("normal"), S.tier_topic("high")


def keys(tps) -> list[tuple[str, int]]:
    return sorted((tp.topic, tp.partition) for tp in tps)


class Consumer:
    """A group member's consumer: the group committed nothing; poll() serves `queue`, one list
    of messages per call; position() is where each partition's fetching is (`positions`)."""

    def __init__(self) -> None:
        self.queue: list[list[Msg]] = []
        self.paused: set[tuple[str, int]] = set()
        self.assigned: set[tuple[str, int]] = set()
        self.positions: dict[tuple[str, int], int] = {}
        self.asked = 0  # position() calls

    def subscribe(self, topics, on_assign, on_revoke, on_lost) -> None:
        self.on_assign, self.on_revoke = on_assign, on_revoke

    def committed(self, tps, timeout=None):
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in tps]

    def incremental_assign(self, tps) -> None:
        self.assigned |= set(keys(tps))

    def incremental_unassign(self, tps) -> None:
        self.assigned -= set(keys(tps))

    def pause(self, tps) -> None:
        self.paused |= set(keys(tps))

    def resume(self, tps) -> None:
        self.paused -= set(keys(tps))

    def position(self, tps):
        self.asked += 1
        return [TopicPartition(tp.topic, tp.partition, self.positions.get((tp.topic, tp.partition), 0)) for tp in tps]

    def poll(self, timeout):
        batch = self.queue.pop(0) if self.queue else []
        self.rest = batch[1:]
        return batch[0] if batch else None

    def consume(self, n, timeout):
        rest, self.rest = self.rest, []
        return rest


class Engine:
    def __init__(self) -> None:
        self.partitions: list[tuple[str, int]] = []
        self.pending_of: dict[str, int] = {}

    def assign(self, tp) -> None:
        self.partitions.append(tp)

    def collect(self) -> None:
        pass

    def revoke(self, tps) -> int:
        self.partitions = [tp for tp in self.partitions if tp not in tps]
        return 0

    def pending_in(self, topic: str) -> int:
        return self.pending_of.get(topic, 0)


class Committer:
    def step(self, force=False, only=None) -> None:
        pass

    def settle(self) -> None:
        pass


def member(*ranges: PartitionRange):
    consumer, engine = Consumer(), Engine()
    flow = FlowControl(S, lambda tier: engine.pending_in(S.tier_topic(tier)))
    window = Window(tuple(dict.fromkeys(r.topic for r in ranges)), ranges, None, None)
    reader = GroupReader(window, consumer, engine, Committer(), flow, Progress({}), None)
    return reader, consumer, engine, flow


def test_a_partition_assigned_while_its_tier_is_paused_starts_paused_and_given_up_drops_what_was_held():
    reader, consumer, engine, flow = member(*(PartitionRange(t, p, 0, 10) for t in (HIGH, NORMAL) for p in (0, 1)))
    consumer.on_assign(consumer, [TopicPartition(NORMAL, 0), TopicPartition(HIGH, 0)])
    assert consumer.paused == set() and consumer.assigned == {(NORMAL, 0), (HIGH, 0)}
    engine.pending_of = {NORMAL: S.max_in_flight, HIGH: S.max_in_flight}  # no room: what comes is held
    assert flow.take([Msg(NORMAL, 0, 0), Msg(NORMAL, 0, 1), Msg(HIGH, 0, 0)]) == []
    assert flow.decide(stopping=False) == ({"normal"}, set())

    consumer.on_assign(consumer, [TopicPartition(NORMAL, 1), TopicPartition(HIGH, 1)])
    assert consumer.paused == {(NORMAL, 1)}, "a partition of the paused tier starts paused, the other reads"
    assert flow.take([Msg(NORMAL, 1, 0), Msg(HIGH, 1, 0)]) == []

    consumer.on_revoke(consumer, [TopicPartition(NORMAL, 0), TopicPartition(HIGH, 1)])
    assert list(flow.held["normal"]) == [Msg(NORMAL, 1, 0)] and list(flow.held["high"]) == [Msg(HIGH, 0, 0)]
    assert set(reader.reading()) == {(HIGH, 0), (NORMAL, 1)}
    assert consumer.assigned == {(NORMAL, 1), (HIGH, 0)}


def test_a_partition_ending_in_transaction_markers_finishes_without_a_position_asked_on_every_poll():
    reader, consumer, _, _ = member(PartitionRange(NORMAL, 0, 0, 5), PartitionRange(NORMAL, 1, 0, 50))
    consumer.on_assign(consumer, [TopicPartition(NORMAL, 0), TopicPartition(NORMAL, 1)])
    consumer.queue = [[Msg(NORMAL, 0, o), Msg(NORMAL, 1, o)] for o in range(4)]  # offset 4 of [0]: a marker
    consumer.positions[(NORMAL, 1)] = 0
    got = [m for _ in range(4) for m in reader.poll(0)]
    assert len(got) == 8
    assert consumer.asked <= 2, "records came on every poll: positions are not asked each time"
    consumer.positions[(NORMAL, 0)] = 5  # past the marker: nothing more comes of it
    time.sleep(0.06)
    assert reader.poll(0) == [] and reader.reading() == [(NORMAL, 1)]
    assert (NORMAL, 0) in consumer.paused, "read to its end: no more fetching"
    consumer.queue = [[Msg(NORMAL, 1, 50, eof=True)]]  # an EOF: its position is asked at once
    consumer.positions[(NORMAL, 1)] = 50
    assert reader.poll(0) == [] and reader.done()

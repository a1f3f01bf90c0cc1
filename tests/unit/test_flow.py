"""Back-pressure decisions, without Kafka or an engine, and how a driver applies them to its
consumer (steer: the worker and replay's readers alike)."""
from __future__ import annotations

from collections import Counter

from inferlog.consumer.flow import FETCH_CHUNK, FlowControl, steer
from inferlog.settings import Settings
from support import Fetched as Msg

S = Settings(max_in_flight=4)
NORMAL, HIGH = S.tier_topic("normal"), S.tier_topic("high")


class Engine:
    """What the engine has per topic: accept() adds, finish() is a commit."""

    def __init__(self) -> None:
        self.pending = Counter()
        self.got: list[Msg] = []

    def accept(self, msgs: list) -> None:
        self.pending.update(m.topic() for m in msgs)
        self.got += msgs

    def finish(self, topic: str, n: int) -> None:
        self.pending[topic] -= n

    def take_over(self, flow: FlowControl) -> None:
        for chunk in flow.hand_over():
            self.accept(chunk)


def flow_with(settings: Settings = S) -> tuple[FlowControl, Engine]:
    engine = Engine()
    return FlowControl(settings, lambda tier: engine.pending[settings.tier_topic(tier)]), engine


def msgs(topic: str, offsets, partition: int = 0) -> list[Msg]:
    return [Msg(topic, partition, o) for o in offsets]


def held(flow: FlowControl) -> list[Msg]:
    return [m for h in flow.held.values() for m in h]


def test_room_for_all_takes_all():
    flow, _ = flow_with()
    batch = msgs(NORMAL, range(S.max_in_flight))
    assert flow.take(batch) == batch
    flow, _ = flow_with()
    batch = msgs(NORMAL, range(3)) + msgs(HIGH, range(3))  # more than one tier's room, not per tier
    assert flow.take(batch) == batch
    assert held(flow) == [] and flow.stats["held"] == 0


def test_a_tier_that_holds_holds_everything_after_so_partitions_stay_in_order():
    flow, engine = flow_with()
    engine.accept(flow.take(msgs(NORMAL, range(6))))
    assert [m.o for m in engine.got] == [0, 1, 2, 3]
    engine.finish(NORMAL, 4)  # room again, but 4 and 5 wait: 6 must not overtake them
    assert flow.take(msgs(NORMAL, [6])) == []
    engine.take_over(flow)
    assert [m.o for m in engine.got] == list(range(7))
    assert held(flow) == [] and flow.stats["held"] == 3


def test_the_high_tier_is_never_held_back_by_a_normal_backlog():
    flow, engine = flow_with()
    engine.accept(flow.take(msgs(NORMAL, range(4))))
    backlog = msgs(NORMAL, range(4, 8))
    urgent = msgs(HIGH, range(3))
    assert flow.take([backlog[0], urgent[0], *backlog[1:], *urgent[1:]]) == urgent
    assert list(flow.held["normal"]) == backlog and not flow.held["high"]
    assert flow.decide(stopping=False) == ({"normal"}, set())
    assert flow.paused == {"normal": True, "high": False}


def test_a_tier_pauses_when_it_holds_max_in_flight_and_resumes_at_half():
    flow, engine = flow_with()
    engine.accept(flow.take(msgs(NORMAL, range(7))))  # 4 in the engine, 3 held
    assert flow.decide(stopping=False) == (set(), set())
    flow.take(msgs(NORMAL, [7]))
    assert flow.decide(stopping=False) == ({"normal"}, set())
    assert flow.decide(stopping=False) == (set(), set())  # paused once, not per turn
    engine.finish(NORMAL, 1)
    engine.take_over(flow)  # 3 held: above half
    assert flow.decide(stopping=False) == (set(), set()) and flow.paused["normal"]
    engine.finish(NORMAL, 1)
    engine.take_over(flow)  # 2 held: half
    assert flow.decide(stopping=False) == (set(), {"normal"})
    assert flow.paused == {"normal": False, "high": False} and flow.stats["pauses"] == 1


def test_stopping_pauses_every_tier_and_never_resumes():
    flow, engine = flow_with()
    engine.accept(flow.take(msgs(NORMAL, range(8))))
    assert flow.decide(stopping=False) == ({"normal"}, set())
    assert flow.decide(stopping=True) == ({"high"}, set())
    flow.drop()
    assert flow.decide(stopping=True) == (set(), set())
    assert flow.paused == {"normal": True, "high": True}
    assert flow.stats["pauses"] == 1  # stopping is not back-pressure


def test_drop_forgets_the_held_records_of_the_partitions_gone_or_all():
    flow, engine = flow_with()
    engine.pending.update(dict.fromkeys(S.request_topics, S.max_in_flight))  # no room: all is held
    p0, p1, h0 = msgs(NORMAL, range(3), 0), msgs(NORMAL, range(2), 1), msgs(HIGH, range(2), 0)
    flow.take([*p0, *h0, *p1])
    assert flow.drop({(NORMAL, 1), (HIGH, 1)}) == 2
    assert list(flow.held["normal"]) == p0 and list(flow.held["high"]) == h0
    assert flow.drop() == 5
    assert held(flow) == []


def test_hand_over_fills_the_room_in_chunks_of_at_most_fetch_chunk():
    flow, engine = flow_with(S.with_overrides(max_in_flight=3 * FETCH_CHUNK))
    backlog = msgs(NORMAL, range(5 * FETCH_CHUNK))
    engine.accept(flow.take(backlog))  # 3 chunks in the engine, 2 held
    engine.finish(NORMAL, FETCH_CHUNK + 10)
    chunks = flow.hand_over()
    assert [len(c) for c in chunks] == [FETCH_CHUNK, 10]
    assert [m for c in chunks for m in c] == backlog[3 * FETCH_CHUNK:4 * FETCH_CHUNK + 10]
    for chunk in chunks:
        engine.accept(chunk)
    assert flow.hand_over() == []  # no room left
    assert list(flow.held["normal"]) == backlog[4 * FETCH_CHUNK + 10:]


class Consumer:
    """What steer asks of a consumer: pause() and resume(), recorded as (call, partitions)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []

    def pause(self, tps) -> None:
        self.calls.append(("pause", sorted((tp.topic, tp.partition) for tp in tps)))

    def resume(self, tps) -> None:
        self.calls.append(("resume", sorted((tp.topic, tp.partition) for tp in tps)))


def test_steer_pauses_a_tier_that_holds_max_in_flight_on_the_partitions_read_and_resumes_it_at_half():
    flow, engine = flow_with()
    consumer = Consumer()
    # (NORMAL, 1) is read to its end: the reader stopped it itself, back-pressure leaves it be
    reading = [(NORMAL, 0), (NORMAL, 2), (HIGH, 0)]
    engine.accept(flow.take(msgs(NORMAL, range(7))))  # 4 in the engine, 3 held: room to hold
    steer(flow, consumer, reading, stopping=False)
    assert consumer.calls == []
    flow.take(msgs(NORMAL, [7], partition=2))  # 4 held: the normal tier pauses, the high one reads on
    steer(flow, consumer, reading, stopping=False)
    assert consumer.calls == [("pause", [(NORMAL, 0), (NORMAL, 2)])]
    steer(flow, consumer, reading, stopping=False)
    assert len(consumer.calls) == 1, "paused once, not every turn"
    engine.finish(NORMAL, 2)
    engine.take_over(flow)  # 2 held: half
    steer(flow, consumer, reading[1:], stopping=False)  # (NORMAL, 0) was read to its end meanwhile
    assert consumer.calls[1:] == [("resume", [(NORMAL, 2)])]
    steer(flow, consumer, reading[1:], stopping=True)  # a stopping driver fetches no more: every tier
    assert sorted(consumer.calls[2:]) == sorted([("pause", [(HIGH, 0)]), ("pause", [(NORMAL, 2)])])

"""The live worker's commit loop (consumer/committer.py `Committer.step`), driven by hand.

The engine is the real one (inline stages, the tiny BERT classifier): records go in through
`accept` and finish through the model, so what a commit carries is what `OffsetTracker.release`
hands out. The emitter is a small fake of our own interface (`transactional`, `commit`) that can
block, abort or be fenced. What Kafka itself does, committed offsets and seeking back to them,
runs against the real broker (the `settings` fixture).
"""
from __future__ import annotations

import threading
from concurrent.futures import wait

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from inferlog.clients import confluent_config
from inferlog.codec import REQUEST, Codec
from inferlog.consumer.committer import Committer
from inferlog.consumer.emit import CommitAborted
from inferlog.consumer.engine import Engine
from inferlog.consumer.metrics import Metrics
from inferlog.consumer.runners import load_runner
from inferlog.errors import FatalError
from inferlog.request import build_request
from inferlog.settings import load_settings
from tinymodels import tiny_bert_classifier_dir  # noqa: F401  (fixture)

CODEC = Codec()
TOPIC = "requests"
TP0, TP1 = (TOPIC, 0), (TOPIC, 1)
HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def runner(tiny_bert_classifier_dir):
    return load_runner(str(tiny_bert_classifier_dir), device="cpu")


def request(offset: int) -> bytes:
    return CODEC.encode(REQUEST, build_request("classify", f"the quick fox number {offset}"))


def finish(engine: Engine, tp: tuple[str, int], offsets, values=None) -> None:
    """Hand these records to the engine and run it until each is answered (tracked, not released)."""
    msgs = [Message(topic=tp[0], partition=tp[1], offset=o, key=b"k", value=request(o) if values is None else v)
            for o, v in zip(offsets, values or offsets)]
    want = engine.tracker.ready_count() + len(msgs)
    engine.accept(msgs)
    for _ in range(50):
        engine.step(flush=True)
        if engine.tracker.ready_count() == want:
            return
    raise AssertionError(f"the engine answered {engine.tracker.ready_count()} of {want}")


def sources(outputs) -> list[tuple[str, int, int]]:
    return [o.source for o in outputs]


class Emitter:
    """Our emitter's interface: records each commit; `gate` blocks it, `fail` is raised by it."""

    transactional = True

    def __init__(self, gate: threading.Event | None = None, fail: BaseException | None = None):
        self.gate, self.fail = gate, fail
        self.calls: list[tuple[list, dict, object]] = []
        self.entered = threading.Event()
        self.returned = 0

    def commit(self, outputs, commits, group_metadata):
        self.calls.append((list(outputs), dict(commits), group_metadata))
        self.entered.set()
        if self.gate is not None and not self.gate.wait(60):
            raise AssertionError("the gate never opened")
        if self.fail is not None:
            raise self.fail
        self.returned += 1

    def close(self):
        pass


class GroupMember:
    """What a transactional commit asks of the consumer: its group metadata, a new one each time."""

    def __init__(self):
        self.handed: list[object] = []

    def consumer_group_metadata(self):
        self.handed.append(object())
        return self.handed[-1]


class Harness:
    def __init__(self, runner, settings, consumer, emitter):
        self.engine = Engine(settings, runner)
        self.metrics = Metrics()
        self.rewinds, self.committed = 0, []
        self.emitter = emitter
        self.c = Committer(settings, consumer, self.engine, emitter, self.metrics,
                           on_rewind=self._rewound, on_commit=lambda outputs, _: self.committed.append(outputs))

    def _rewound(self):
        self.rewinds += 1

    def settle(self) -> None:
        """Wait for the commit in flight to end (not accounting for it: the next step does)."""
        assert self.c.in_flight is not None
        done, _ = wait([self.c.in_flight.future], timeout=60)
        assert done, "the commit did not end"

    def count(self, outcome: str) -> float:
        return self.metrics.registry.get_sample_value("inferlog_commits_total", {"outcome": outcome})

    def close(self) -> None:
        self.c.pool.shutdown(wait=True)
        self.engine.close()


@pytest.fixture
def make(runner):
    made = []

    def build(emitter=None, interval_ms: float = 0.0, consumer=None, settings=None) -> Harness:
        s = (settings or load_settings(requests_topic=TOPIC)).with_overrides(stages="inline",
                                                                             commit_interval_ms=interval_ms)
        h = Harness(runner, s, consumer if consumer is not None else GroupMember(), emitter or Emitter())
        for tp in {TP0, TP1} if settings is None else ():
            h.engine.assign(tp)
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


def test_a_commit_carries_what_the_engine_finished_with_the_group_metadata_of_its_start(make):
    """Each partition's finished prefix in one commit, with offset+1 and the group metadata read
    when it started; the next turn accounts for it (stats, metrics, on_commit); no work, no commit."""
    h = make()
    h.c.step()
    assert not h.c.busy and h.emitter.calls == []  # nothing finished: nothing starts
    finish(h.engine, TP0, [0, 1, 2])
    finish(h.engine, TP1, [7, 8])
    h.c.step()
    h.settle()
    outputs, commits, meta = h.emitter.calls[0]
    assert commits == {TP0: 3, TP1: 9}
    assert sorted(sources(outputs)) == [(TOPIC, 0, 0), (TOPIC, 0, 1), (TOPIC, 0, 2), (TOPIC, 1, 7), (TOPIC, 1, 8)]
    assert meta is h.c.consumer.handed[-1] and h.engine.pending == 0
    assert h.c.stats["commits"] == 0 and h.committed == []  # accounted for on the next turn
    h.c.step()
    assert h.c.stats == {"commits": 1, "aborts": 0} and h.count("ok") == 1 and not h.c.busy
    assert h.committed == [outputs] and len(h.emitter.calls) == 1


def test_nothing_starts_within_commit_interval_ms_of_the_last_start_unless_forced(make):
    """The floor counts from the last start: finished work waits in the engine until it has
    passed (here: the clock is set an interval back), and a forced step ignores it."""
    h = make(interval_ms=HOUR_MS)
    finish(h.engine, TP0, [0, 1])
    h.c.step()
    assert h.emitter.calls == [] and h.engine.pending == 2  # not even released
    h.c.step(force=True)
    assert [c[1] for c in h.emitter.calls] == [{TP0: 2}] and h.c.stats["commits"] == 1
    finish(h.engine, TP0, [2])
    h.c.step()
    assert len(h.emitter.calls) == 1 and h.engine.pending == 1  # the forced start counts as the last
    h.c.last -= HOUR_MS / 1000  # an interval has passed since
    h.c.step()
    h.settle()
    assert [c[1] for c in h.emitter.calls] == [{TP0: 2}, {TP0: 3}]


def test_one_commit_at_a_time_and_the_next_takes_everything_finished_meanwhile(make):
    """While a commit runs, steps start nothing and release nothing; the step after it ended
    accounts for it and starts one commit with all that finished meanwhile, in offset order."""
    gate = threading.Event()
    h = make(Emitter(gate))
    finish(h.engine, TP0, [0, 1])
    h.c.step()
    assert h.emitter.entered.wait(60)
    finish(h.engine, TP0, [2, 3])
    finish(h.engine, TP1, [0])
    for _ in range(3):
        h.c.step()
    assert len(h.emitter.calls) == 1 and h.engine.pending == 3 and h.c.busy
    gate.set()
    h.settle()
    finish(h.engine, TP0, [4])
    h.c.step()
    assert h.c.stats["commits"] == 1 and h.c.busy and h.engine.pending == 0
    h.settle()
    outputs, commits, _ = h.emitter.calls[1]
    assert commits == {TP0: 5, TP1: 1}
    assert [s for s in sources(outputs) if s[1] == 0] == [(TOPIC, 0, 2), (TOPIC, 0, 3), (TOPIC, 0, 4)]
    assert (TOPIC, 1, 0) in sources(outputs) and len(outputs) == 4
    h.c.step()
    assert h.c.stats["commits"] == 2 and h.committed == [h.emitter.calls[0][0], outputs]


def test_a_forced_step_waits_for_the_commit_in_flight_and_for_its_own(make):
    """force (a revocation, a stop): when step returns, the running commit and one more with
    everything finished since have ended and are accounted for."""
    gate = threading.Event()
    h = make(Emitter(gate))
    finish(h.engine, TP0, [0])
    h.c.step()
    assert h.emitter.entered.wait(60)
    finish(h.engine, TP1, [0, 1])
    opener = threading.Timer(0.3, gate.set)  # the first commit is still running when force starts
    opener.start()
    h.c.step(force=True)
    opener.join()
    assert h.emitter.returned == 2 and h.c.stats["commits"] == 2 and not h.c.busy
    assert [c[1] for c in h.emitter.calls] == [{TP0: 1}, {TP1: 2}] and h.engine.pending == 0
    assert len(h.committed) == 2 and h.count("ok") == 2


def test_only_commits_the_given_partitions(make):
    """force+only (partitions being revoked): just their finished work goes; the others' stays
    in the engine for a later commit."""
    h = make()
    finish(h.engine, TP0, [0, 1])
    finish(h.engine, TP1, [0, 1, 2])
    h.c.step(force=True, only={TP0})
    outputs, commits, _ = h.emitter.calls[0]
    assert commits == {TP0: 2} and sources(outputs) == [(TOPIC, 0, 0), (TOPIC, 0, 1)]
    assert h.engine.pending == 3
    h.c.step(force=True)
    assert h.emitter.calls[1][1] == {TP1: 3} and h.engine.pending == 0


@pytest.mark.parametrize("force", [False, True])
def test_a_fenced_producer_stops_the_worker(make, force):
    """The emitter's FatalError comes out of step (accounted the turn after it ended, or at once
    when forced): no rewind, not counted as a commit or an abort."""
    h = make(Emitter(fail=FatalError("fenced")))
    finish(h.engine, TP0, [0])
    with pytest.raises(FatalError, match="fenced"):
        h.c.step(force=force)
        h.settle()
        h.c.step()
    assert h.rewinds == 0 and h.c.stats == {"commits": 0, "aborts": 0} and h.committed == []
    assert h.count("aborted") == 0 and h.count("ok") == 0


# -- against the broker: committed offsets and seeking back to them --------------------------
PRODUCED = {0: 8, 1: 6}  # records per partition
COMMITTED = {0: 3, 1: 2}  # the group's offsets before the test's own commit


@pytest.fixture
def fetched(broker_settings):
    """The group has committed COMMITTED; a real consumer of it is assigned there and has fetched
    every record after it (PRODUCED in all): the consumer and those records by partition."""
    p = Producer(confluent_config(broker_settings))
    for part, n in PRODUCED.items():
        for o in range(n):
            p.produce(broker_settings.tier_topic("normal"), request(o), partition=part)
    assert p.flush(30) == 0
    c = Consumer(confluent_config(broker_settings, **{
        "group.id": broker_settings.worker_group, "enable.auto.commit": False, "auto.offset.reset": "error",
        "isolation.level": "read_committed"}))
    tps = [TopicPartition(broker_settings.tier_topic("normal"), part, off) for part, off in COMMITTED.items()]
    c.commit(offsets=tps, asynchronous=False)
    c.assign(tps)
    got = {part: [] for part in PRODUCED}
    for _ in range(300):
        for m in c.consume(100, 0.2):
            assert m.error() is None, m.error()
            got[m.partition()].append(m)
        if all(len(got[part]) == PRODUCED[part] - COMMITTED[part] for part in PRODUCED):
            break
    assert [m.offset() for m in got[0]] == list(range(COMMITTED[0], PRODUCED[0]))
    assert [m.offset() for m in got[1]] == list(range(COMMITTED[1], PRODUCED[1]))
    yield c, got
    c.close()


def next_offsets(consumer, parts) -> dict[int, int]:
    """The offset of the next record fetched from each partition."""
    first: dict[int, int] = {}
    for _ in range(300):
        for m in consumer.consume(100, 0.2):
            assert m.error() is None, m.error()
            first.setdefault(m.partition(), m.offset())
        if set(first) >= set(parts):
            return first
    raise AssertionError(f"fetched nothing more from {set(parts) - set(first)}")


def answered(engine, settings, got) -> None:
    for part, msgs in got.items():
        finish(engine, (settings.tier_topic("normal"), part), [m.offset() for m in msgs], [m.value() for m in msgs])


def test_an_aborted_commit_rewinds_to_the_committed_offsets(make, broker_settings, fetched):
    """The emitter aborts: the abort is counted, the engine forgets all unreleased work (its
    partitions stay, under new epochs), on_rewind runs, and the consumer seeks back: its next
    records are the ones after the group's committed offsets, not after what it fetched."""
    consumer, got = fetched
    h = make(Emitter(fail=CommitAborted("transaction aborted")), consumer=consumer, settings=broker_settings)
    tps = [(broker_settings.tier_topic("normal"), part) for part in PRODUCED]
    for tp in tps:
        h.engine.assign(tp)
    epochs = [h.engine.tracker.epoch(tp) for tp in tps]
    answered(h.engine, broker_settings, got)
    h.c.step(force=True)
    assert h.emitter.calls[0][1] == {tp: PRODUCED[tp[1]] for tp in tps}  # it was asked to commit them all
    assert h.c.stats == {"commits": 0, "aborts": 1} and h.count("aborted") == 1 and h.count("ok") == 0
    assert h.rewinds == 1 and h.committed == [] and not h.c.busy
    assert h.engine.pending == 0 and sorted(h.engine.partitions) == sorted(tps)
    assert all(h.engine.tracker.epoch(tp) != e for tp, e in zip(tps, epochs))
    assert next_offsets(consumer, PRODUCED) == COMMITTED


def test_at_least_once_commits_the_offsets_after_the_emitter_returned(make, broker_settings, fetched):
    """A non-transactional emitter delivers only; the committer then commits offset+1 of what it
    delivered to the group itself, synchronously: the group's committed offsets move there."""
    consumer, got = fetched
    emitter = Emitter()
    emitter.transactional = False
    h = make(emitter, consumer=consumer, settings=broker_settings)
    for part in PRODUCED:
        h.engine.assign((broker_settings.tier_topic("normal"), part))
    answered(h.engine, broker_settings, got)
    h.c.step(force=True)
    assert h.c.stats == {"commits": 1, "aborts": 0} and h.rewinds == 0
    committed = consumer.committed([TopicPartition(broker_settings.tier_topic("normal"), part) for part in PRODUCED],
                                   timeout=30)
    assert {tp.partition: tp.offset for tp in committed} == PRODUCED

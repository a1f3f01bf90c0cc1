"""A shared replay run: one run spread over processes or hosts, coordinated by Kafka alone.

The starter snapshots the window and publishes the run's definition (what checkpoint.json
holds: the window, the shaping settings, the output, the model name) on the compacted topic
`replays_topic`, keyed by the run id. A member (`inferlog replay --join RUN_ID`, or
`--resume RUN_ID` on any host) reads it there and joins the run's consumer group
`inferlog-replay-<run_id>` by subscribing to the window's topics: the broker's assignor
spreads the partitions (range: a balanced share of each tier's topic), and a member reads
each of its partitions from the group's committed offset (or the window's start) to the
window's end. Each commit is one transaction carrying the consumer's group metadata, so the
committed offsets stay the run's one checkpoint and a zombie member is fenced.

A member ends when the group's committed offsets cover the whole window, not only its own
share: until then it stays in the group, so that a crashed member's partitions come to it.
"""
from __future__ import annotations

import json
import logging
import time

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from inferlog.clients import confluent_config, consume_ready
from inferlog.committed import OffsetsUnreadable, committed_offsets, last_committed
from inferlog.consumer.membership import let_go
from inferlog.consumer.records import Out
from inferlog.request import now_ms

from .checkpoint import ReplayError
from .window import Window, WindowError, read_window, resolve_window, settle, window_consumer

log = logging.getLogger(__name__)

# compacted: the latest definition of a run and the latest totals of each member are kept
TOPIC_CONFIG = {"cleanup.policy": "compact", "segment.ms": str(3_600_000)}


def _member_key(run_id: str, member: str) -> str:
    return f"{run_id}/{member}"  # a run id holds no '/': never a definition's key


def read_run(settings, run_id: str, committed: bool = False) -> tuple[dict | None, dict[str, dict]]:
    """(the run's definition or None, {member: its totals}) from the replays topic. The
    definition is written plainly, and is read uncommitted: an open transaction of another
    run's member must not hide it. The totals are read `committed`, once settled: they are
    written in the members' transactions."""
    level = "read_committed" if committed else "read_uncommitted"
    try:
        if committed:
            settle(settings, settings.replays_topic)
        w = resolve_window(settings, settings.replays_topic,
                           consumer=window_consumer(settings, **{"isolation.level": level}))
    except WindowError:  # no such topic: no shared run was ever started
        return None, {}
    latest: dict[str, bytes | None] = {}
    for m in read_window(settings, w, consumer_conf={"isolation.level": level}):
        latest[m.key().decode()] = m.value()
    definition = latest.get(run_id)
    prefix = _member_key(run_id, "")
    members = {k[len(prefix):]: json.loads(v) for k, v in latest.items() if k.startswith(prefix) and v}
    return (json.loads(definition) if definition else None), members


def publish_definition(settings, run_id: str, data: dict) -> None:
    """Make a run joinable from any host; refuses a run id that is already defined."""
    from inferlog.topics import ensure_topics

    ensure_topics(settings, [settings.replays_topic], partitions=1, config=TOPIC_CONFIG)
    if read_run(settings, run_id)[0] is not None:
        raise ReplayError(f"replay run {run_id!r} is already defined on {settings.replays_topic}; "
                          f"join it with --join {run_id}")
    p = Producer(confluent_config(settings, **{"enable.idempotence": True, "acks": "all"}))
    p.produce(settings.replays_topic, json.dumps({"run_id": run_id, "created_at": now_ms(), **data}).encode(),
              run_id.encode())
    if p.flush(30):
        raise ReplayError(f"could not write to {settings.replays_topic} on {settings.bootstrap_servers}")


class MemberTally:
    """A member's totals (results, dead letters) on the replays topic, written in each of its
    transactions: exactly what its committed offsets cover, so that any member's summary
    counts the whole run, crashes included."""

    def __init__(self, settings, run_id: str, member: str):
        self.s, self.run_id, self.member = settings, run_id, member
        self.key = _member_key(run_id, member).encode()

    def out(self, counts: dict) -> Out:
        return Out(self.s.replays_topic, self.key, json.dumps(counts).encode(), [])

    def committed(self) -> dict:
        """This member's totals so far (read after its producer fenced a predecessor's)."""
        return read_run(self.s, self.run_id, committed=True)[1].get(self.member, {"results": 0, "dead_letters": 0})


def run_totals(settings, run_id: str) -> dict:
    """The whole run's results and dead letters: the sum over its members' totals."""
    members = read_run(settings, run_id, committed=True)[1].values()
    return {k: sum(m.get(k, 0) for m in members) for k in ("results", "dead_letters")}


class GroupReader:
    """The records of a shared run that this member's share of the group holds, in offset
    order per partition; the same interface as WindowReader, for replay's loop.

    On revocation `committer` (the run's, consumer/committer.py) commits what is finished of
    those partitions while they are still ours, and the rest is dropped for the next owner to
    redo, as the live worker does (consumer/membership.py), records held by `flow` (the run's
    back-pressure, consumer/flow.py) included. A partition assigned while its tier is paused
    starts paused, as the worker's do."""

    member = True  # keeps polling when its share is read: rebalances and heartbeats go on

    def __init__(self, window: Window, consumer, engine, committer, flow, progress, offsets_reader):
        self.window, self.consumer, self.engine, self.committer, self.flow = window, consumer, engine, committer, flow
        self.progress = progress  # the run's Progress: where this member's share of a partition starts
        self.offsets_reader = offsets_reader  # the run group's (a group_reader), for its progress (finished)
        self._range = {r.tp: r for r in window.ranges}
        self._end: dict[tuple[str, int], int] = {}  # ours and not yet read to the end
        self.closing = False
        self._checked = 0.0
        self._looked = 0.0  # when the positions of the partitions being read were last compared to their ends
        self._said = time.monotonic()  # the first "waiting" line after 10 s, not before any assignment
        consumer.subscribe(list(window.topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)

    # -- rebalance callbacks (inside consume(), on the loop thread) -------------------------
    def _on_assign(self, consumer, partitions) -> None:
        inside = [tp for tp in partitions if (tp.topic, tp.partition) in self._range]
        self.committer.settle()  # this member's own commit in flight ends before its offsets are read
        # require_stable (read_committed): a transaction of the previous owner is settled first
        done = {(tp.topic, tp.partition): tp.offset for tp in committed_offsets(consumer, inside)} if inside else {}
        read, idle = [], []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            r = self._range.get(key)
            start = max(r.start, done.get(key, -1)) if r is not None else None
            if start is None or start >= r.end:  # outside the window, or done: held, never read
                idle.append(TopicPartition(tp.topic, tp.partition))
                continue
            self._end[key] = r.end
            self.progress.position[key] = start  # where this member's share of it starts
            self.engine.assign(key)
            read.append(TopicPartition(tp.topic, tp.partition, start))
        consumer.incremental_assign(read + idle)
        held_back = [tp for tp in read if self.flow.is_paused(tp.topic)]  # its tier is paused: so is it
        if idle or held_back:
            consumer.pause(idle + held_back)
        if go := [tp for tp in read if tp not in held_back]:  # paused here before (read to its end, then revoked)
            consumer.resume(go)
        if partitions:  # the consumer protocol also calls with none, after a revocation
            log.info("assigned %d partitions to read, %d done or outside the window", len(read), len(idle))

    def _on_revoke(self, consumer, partitions) -> None:
        self._give_up(consumer, partitions, commit_first=True)

    def _on_lost(self, consumer, partitions) -> None:
        self._give_up(consumer, partitions, commit_first=False)  # not ours any more: a commit is fenced

    def _give_up(self, consumer, partitions, commit_first: bool) -> None:
        gone, _ = let_go(consumer, partitions, self.engine, self.committer, commit_first=commit_first,
                         closing=self.closing)
        self.flow.drop(gone)  # fetched, never handed over: the next owner reads them from the committed offsets
        for key in gone:
            self._end.pop(key, None)

    # -- reading ---------------------------------------------------------------------------
    def done(self) -> bool:
        """Nothing of this member's share is left to fetch (more may be assigned later)."""
        return not self._end

    def reading(self) -> list[tuple[str, int]]:
        """The (topic, partition)s ours and not read to their end: the ones back-pressure may
        pause and resume (consumer/flow.py steer); finished and idle ones stay paused here."""
        return list(self._end)

    def poll(self, timeout: float = 0.5) -> list:
        out, eof = [], False
        for msg in consume_ready(self.consumer, 500, timeout):
            key = (msg.topic(), msg.partition())
            end = self._end.get(key)
            if end is None:  # not ours to read
                continue
            if (err := msg.error()) is not None:
                if err.code() != KafkaError._PARTITION_EOF and (err.fatal() or not err.retriable()):
                    raise KafkaException(err)
                eof = True  # an EOF: the position check below
                continue
            if msg.offset() < end:
                out.append(msg)
            if msg.offset() >= end - 1:
                self._finish(key)
        # read_committed: the last offsets before an end may be transaction markers, never
        # delivered. A partition whose position passed its end is finished; the positions are
        # compared after an EOF, after a poll that brought nothing (at most every 50 ms) and at
        # least once a second, not on every poll.
        now = time.monotonic()
        if self._end and (eof or now - self._looked >= (0.05 if not out else 1.0)):
            self._looked = now
            for key in [k for k in self._end if self._reached(k)]:
                self._finish(key)
        return out

    def _reached(self, key) -> bool:
        pos = self.consumer.position([TopicPartition(*key)])[0].offset
        return pos >= self._end[key]

    def _finish(self, key) -> None:
        del self._end[key]
        self.consumer.pause([TopicPartition(*key)])  # still ours until a rebalance: only stop fetching

    def finished(self) -> bool:
        """The group's committed offsets cover the whole window (asked once a second). Until
        then this member waits in the group, saying so every 10 s."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return False
        self._checked = now
        tps = [TopicPartition(r.topic, r.partition) for r in self.window.ranges if r.size]
        try:  # not waiting for the other members' open transactions: never ahead of the commits
            got = {(tp.topic, tp.partition): tp.offset for tp in last_committed(self.offsets_reader, tps, 5)}
        except OffsetsUnreadable as e:  # coordinator away: asked again in a second
            log.debug("committed offsets: %s", e)
            return False
        done = sum(r.done(got.get(r.tp)) for r in self.window.ranges)
        if done >= self.window.total:
            return True
        if now - self._said >= 10.0:
            self._said = now
            log.info("waiting for the other members: %d of %d records of the run committed",
                     done, self.window.total)
        return False

    def close(self) -> None:
        self.closing = True  # revocation while closing only lets go: nothing is left to commit

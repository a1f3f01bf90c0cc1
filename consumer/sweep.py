"""What a worker's transactions left hanging, found and settled by the worker itself.

Kafka 4.x skips a transaction marker whose partition has no leader at that moment (its rule
for deleted topics) and completes the transaction anyway. On one node every leader is gone
while the broker stops or comes back, so a transaction ending just then hangs: its offsets stay
pending in the group (a successor's committed-offset read never answers) and its records hold
their partition's last stable offset back (read_committed readers stall). Any later marker of
the same producer id ends it, but only on the partitions that marker reaches, so by the time
anyone looks the offsets may have been committed by a later transaction while results are
still open, or the other way round.

The sweep settles it by what is true now, not by a guessed outcome (README, "A hanging
transaction is swept"):
1. read this worker's records between each partition's last stable offset and its end (read
   uncommitted, decoded: their worker id and source request);
2. abort one empty transaction over every partition it writes to and the group's offsets:
   whatever hung is now aborted, results and pending offsets alike;
3. of the records read in 1, those now invisible whose request is committed in the group
   (the offsets say it is done) and answered by no visible record, are produced again, in a
   transaction of their own. A request is then answered exactly once, or not yet and redone.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from inferlog.clients import confluent_config, retry

log = logging.getLogger(__name__)

SWEEP_KEY = b"inferlog-sweep"  # key and header of the sweep's own (aborted) records


class Candidate(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list
    source: tuple[str, int, int]  # the request (topic, partition, offset) it answers


class Ranges(NamedTuple):
    ends: dict[tuple[str, int], tuple[int, int]]  # (topic, partition) -> (last stable, end)


def _reader(settings, isolation: str) -> Consumer:
    """A reader by assignment. Its group id is the worker's own (the one its role may use); it
    never subscribes or commits, so it never joins that group."""
    return Consumer(confluent_config(settings, **{"group.id": settings.worker_group, "enable.auto.commit": False,
                                                  "isolation.level": isolation}))


def open_ranges(settings, topics: tuple, timeout: float) -> Ranges:
    """Per partition of `topics`, its last stable offset and its end, where they differ."""
    raw, stable = _reader(settings, "read_uncommitted"), _reader(settings, "read_committed")
    try:
        ends = {}
        for t in topics:
            md = raw.list_topics(t, timeout=timeout).topics.get(t)
            if md is None or md.error:
                continue
            for p in md.partitions:
                tp = TopicPartition(t, p)  # a partition just made or a broker just back: asked again
                end = retry(lambda tp=tp: raw.get_watermark_offsets(tp, timeout=timeout, cached=False), f"{tp}")[1]
                lso = retry(lambda tp=tp: stable.get_watermark_offsets(tp, timeout=timeout, cached=False), f"{tp}")[1]
                if lso < end:
                    ends[(t, p)] = (lso, end)
        return Ranges(ends)
    finally:
        raw.close()
        stable.close()


def read_range(settings, isolation: str, spans: dict, timeout: float) -> list:
    """The records of `spans` ((topic, partition) -> (from, to)) a reader of `isolation` sees."""
    if not spans:
        return []
    c = _reader(settings, isolation)
    try:
        c.assign([TopicPartition(t, p, lo) for (t, p), (lo, _) in spans.items()])
        left = {tp: hi for tp, (lo, hi) in spans.items() if hi > lo}
        out, deadline = [], time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(m.error())  # not allowed to read it, say: the caller decides
                tp = (m.topic(), m.partition())
                if tp in left and m.offset() < left[tp]:
                    out.append(m)
            for tp in list(left):  # a read_committed reader skips aborted records and markers
                if c.position([TopicPartition(*tp)])[0].offset >= left[tp]:
                    del left[tp]
        return out
    finally:
        c.close()


def ours(messages: list, codec, worker_id: str) -> list[Candidate]:
    """The records of `messages` this worker wrote, with the request each answers."""
    got = []
    for m in messages:
        if m.key() == SWEEP_KEY or not m.value():
            continue
        try:
            _, rec = codec.decode_named(m.value())
        except Exception:  # noqa: BLE001 - not a result or dead letter (a replay's tally, say): not ours to settle
            continue
        src = rec.get("source")
        if rec.get("worker_id") != worker_id or not isinstance(src, dict):
            continue
        got.append(Candidate(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or [],
                             (src["topic"], src["partition"], src["offset"])))
    return got


def to_restore(candidates: list[Candidate], visible: list, committed: dict, codec) -> list[Candidate]:
    """Candidates whose request the group counts as done (committed past it) and no visible
    record answers: what the aborted sweep took away, and must be produced again."""
    seen = {(m.topic(), m.partition(), m.offset()) for m in visible}
    answered = set()
    for m in visible:
        try:
            src = codec.decode_named(m.value())[1].get("source")
        except Exception:  # noqa: BLE001 - a record that is no result: answers nothing
            continue
        if isinstance(src, dict):
            answered.add((src["topic"], src["partition"], src["offset"]))
    return [c for c in candidates
            if (c.topic, c.partition, c.offset) not in seen and c.source not in answered
            and committed.get(c.source[:2], -1) > c.source[2]]


def settled(settings, spans: dict, timeout: float) -> dict:
    """`spans` ((topic, partition) -> (from, past its last open record)) stretched to their
    partition's last stable offset once that is past the span (another worker's open
    transaction holds it back until it ends: waited for, at most `timeout`): what a
    read_committed reader can see of them, later answers included. Spans it never passes are
    left out, with a warning (their records stay aborted, their requests redone if not done)."""
    stable = _reader(settings, "read_committed")
    try:
        out, left, deadline = {}, dict(spans), time.monotonic() + timeout
        while left:
            for tp, (lo, hi) in list(left.items()):
                lso = stable.get_watermark_offsets(TopicPartition(*tp), timeout=10, cached=False)[1]
                if lso >= hi:
                    out[tp] = (lo, lso)
                    del left[tp]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if left:
            log.warning("sweep: %s still held back by an open transaction; its records are left aborted",
                        " ".join(f"{t}[{p}]" for t, p in left))
        return out
    finally:
        stable.close()

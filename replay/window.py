"""A bounded window of one or more topics: which offsets of which (topic, partition), resolved once.

A window is resolved against the broker at one moment (offsets_for_times for the time
edges, the high watermarks as a snapshot of the end), so a replay or an audit over it
reads a fixed set of records however long it runs and whatever arrives meanwhile.
Reading uses manual assignment and never commits: no consumer group's offsets move.
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Iterator, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from inferlog.clients import confluent_config, consume_ready
from inferlog.errors import ConfigError
from inferlog.request import now_ms
from inferlog.timefmt import iso_ms, parse_duration

_TIMEOUT = 10.0
# a partition's leader is elected or moving (a topic just created, a broker restarting): the
# answer is a moment's state, asked again; the client flags few of these as retriable itself
_TRANSIENT = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.REPLICA_NOT_AVAILABLE,
              KafkaError.OFFSET_NOT_AVAILABLE, KafkaError.UNKNOWN_LEADER_EPOCH, KafkaError.FENCED_LEADER_EPOCH}


class WindowError(ConfigError):
    """A window that cannot be resolved: unknown topic, bad time, bad offsets spec."""


@dataclass(frozen=True)
class PartitionRange:
    topic: str
    partition: int
    start: int  # first offset in the window
    end: int  # first offset past it: [start, end)

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)

    def done(self, to: int | None) -> int:
        """Records of the range before offset `to` (None: none done)."""
        return max(0, min(self.start if to is None else to, self.end) - self.start)


@dataclass(frozen=True)
class Window:
    topics: tuple[str, ...]  # every topic the window covers, also those whose ranges are empty
    ranges: tuple[PartitionRange, ...]
    since_ms: int | None
    until_ms: int | None

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)

    def contains(self, topic: str, partition: int, offset: int) -> bool:
        return any(r.tp == (topic, partition) and r.start <= offset < r.end for r in self.ranges)

    def rest(self, done_to: dict[tuple[str, int], int]) -> "Window":
        """The part of the window past `done_to` {(topic, partition): first offset not done}."""
        return replace(self, ranges=tuple(replace(r, start=min(r.end, max(r.start, done_to.get(r.tp, r.start))))
                                          for r in self.ranges))

    def spec(self) -> str:
        """The ranges as a topic-qualified --offsets spec (what an error message can show)."""
        return ",".join(f"{r.topic}:{r.partition}:{r.start}-{r.end}" for r in self.ranges)

    def to_dict(self) -> dict:
        return {"topics": list(self.topics), "since_ms": self.since_ms, "until_ms": self.until_ms,
                "ranges": [[r.topic, r.partition, r.start, r.end] for r in self.ranges]}

    @classmethod
    def from_dict(cls, d: dict) -> "Window":
        if "topic" in d:  # version 1 (one topic): ranges are [partition, start, end]
            return cls((d["topic"],), tuple(PartitionRange(d["topic"], *r) for r in d["ranges"]),
                       d.get("since_ms"), d.get("until_ms"))
        return cls(tuple(d["topics"]), tuple(PartitionRange(*r) for r in d["ranges"]), d.get("since_ms"),
                   d.get("until_ms"))


def parse_time(text: str, tz: str | None = None) -> int:
    """Epoch milliseconds from ISO 8601 (with an offset, or naive in `tz`, default UTC),
    a relative "-2h"/"-30m"/"-1d", "now", or bare epoch milliseconds."""
    s = text.strip()
    if s.lower() == "now":
        return now_ms()
    if s.startswith("-"):  # relative: no ISO 8601 date starts with a minus
        try:
            return now_ms() - parse_duration(s[1:], bare=None)
        except ValueError:
            raise _unreadable(text) from None
    if s.isdigit() and len(s) >= 11:  # epoch ms; shorter digit runs are more likely typos
        return int(s)
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise _unreadable(text) from None
    if dt.tzinfo is None:
        try:
            dt = dt.replace(tzinfo=ZoneInfo(tz) if tz else timezone.utc)
        except (ZoneInfoNotFoundError, ValueError):
            raise WindowError(f"unknown time zone {tz!r} (use an IANA name like Europe/Berlin)") from None
    return int(dt.timestamp() * 1000)


def _unreadable(text: str) -> WindowError:
    return WindowError(f"cannot read time {text!r}: use ISO 8601 (2026-11-23T10:00:00+01:00), "
                       f"a relative time (-2h, -30m, -1d), 'now' or epoch milliseconds")


def parse_offsets(spec: str, topics: Sequence[str]) -> dict[tuple[str, int], tuple[int | None, int | None]]:
    """"0:100-200,3:0-50,4:7-,5" -> {(T, 0): (100, 200), (T, 3): (0, 50), (T, 4): (7, None), (T, 5): (None, None)}
    for a window of the one topic T. Ranges are half-open like Python's: 100-200 is offsets
    100..199; a missing end is the snapshotted end of the partition, a bare partition is all
    of it. An entry may name its topic, "inferlog.requests.high:0:100-200"; it must when the
    window has several topics, since an offset means nothing without its topic."""
    out: dict[tuple[str, int], tuple[int | None, int | None]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        # a topic name cannot hold ':', so the first field is a topic unless it is the partition
        m = re.fullmatch(r"(?:([A-Za-z0-9._-]+):)?(\d+)(?::(\d*)-(\d*))?", part)
        if not m:
            raise WindowError(f"bad offsets {part!r}: expected [TOPIC:]PARTITION:START-END, e.g. 0:100-200")
        topic, p = m[1], int(m[2])
        start, end = (int(m[3]) if m[3] else None), (int(m[4]) if m[4] else None)
        if start is not None and end is not None and end < start:
            raise WindowError(f"bad offsets {part!r}: end before start")
        if topic is None:
            if len(topics) != 1:
                raise WindowError(f"--offsets {part!r} names no topic, and the window covers {', '.join(topics)}: "
                                  f"write TOPIC:{part} or choose the topic with --topic")
            topic = topics[0]
        elif topic not in topics:
            raise WindowError(f"--offsets {part!r} names topic {topic!r}, not one of the window's "
                              f"({', '.join(topics)}); choose it with --topic")
        if (topic, p) in out:
            raise WindowError(f"partition {p} of {topic} appears twice in --offsets")
        out[(topic, p)] = (start, end)
    if not out:
        raise WindowError("--offsets names no partition")
    return out


def _partitions(spec: str | list[int]) -> list[int]:
    if isinstance(spec, str):
        try:
            return sorted({int(p) for p in spec.split(",") if p.strip()})
        except ValueError:
            raise WindowError(f"bad --partitions {spec!r}: expected numbers like 0,2") from None
    return sorted(set(spec))


def window_consumer(settings, **extra) -> Consumer:
    """A consumer that reads by manual assignment and never commits. The group id is a
    throwaway unless the caller passes one (a replay's own checkpoint group)."""
    conf = confluent_config(settings, **{
        "group.id": f"inferlog-window-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
        **extra,
    })
    return Consumer(conf)


def resolve_window(settings, topics: str | Sequence[str], *, since: str | int | None = None,
                   until: str | int | None = None, tz: str | None = None, offsets: str | None = None,
                   partitions: str | list[int] | None = None, consumer: Consumer | None = None) -> Window:
    """Resolve the window's edges against the broker now, over one topic or several (both
    tiers' request topics, say). Time edges are exact in offset terms: start = first offset
    with timestamp >= since, end = first offset with timestamp >= until, else the high
    watermark snapshotted here. `partitions` applies to every topic; `offsets` (see
    parse_offsets) narrows the window to the topics and partitions it names. An empty
    window is returned as such (total 0); callers decide what that means."""
    topics = (topics,) if isinstance(topics, str) else tuple(dict.fromkeys(topics))
    since_ms = since if isinstance(since, int) or since is None else parse_time(since, tz)
    until_ms = until if isinstance(until, int) or until is None else parse_time(until, tz)
    now = now_ms()
    if since_ms is not None and since_ms > now:
        raise WindowError(f"--since {iso_ms(since_ms)} is in the future (now is {iso_ms(now)})")
    if since_ms is not None and until_ms is not None and since_ms > until_ms:
        raise WindowError(f"--since {iso_ms(since_ms)} is after --until {iso_ms(until_ms)}")
    wanted = parse_offsets(offsets, topics) if offsets else {}
    if wanted:
        topics = tuple(t for t in topics if any(k[0] == t for k in wanted))
    own = consumer is None
    consumer = consumer or window_consumer(settings)
    try:
        # every topic's edges before any is read: one snapshot, and an unknown topic fails first
        ranges = [r for t in topics for r in _resolve_topic(settings, consumer, t, since_ms, until_ms,
                                                           {p: se for (tt, p), se in wanted.items() if tt == t},
                                                           partitions)]
        return Window(topics, tuple(ranges), since_ms, until_ms)
    finally:
        if own:
            consumer.close()


def _resolve_topic(settings, consumer: Consumer, topic: str, since_ms: int | None, until_ms: int | None,
                   wanted: dict[int, tuple[int | None, int | None]],
                   partitions: str | list[int] | None) -> list[PartitionRange]:
    try:
        md = consumer.list_topics(topic, timeout=_TIMEOUT).topics.get(topic)
    except KafkaException as e:
        raise WindowError(f"cannot describe topic {topic!r} on {settings.bootstrap_servers}: {e}") from e
    if md is None or md.error is not None or not md.partitions:
        raise WindowError(f"unknown topic {topic!r} on {settings.bootstrap_servers}")
    known = sorted(md.partitions)
    chosen = sorted(wanted) if wanted else (_partitions(partitions) if partitions is not None else known)
    if missing := [p for p in chosen if p not in md.partitions]:
        raise WindowError(f"topic {topic!r} has partitions {known[0]}..{known[-1]}, not {missing}")
    if partitions is not None and wanted and set(_partitions(partitions)) != set(chosen):
        raise WindowError("--offsets and --partitions name different partitions; give one of them")
    lo_hi = {p: _patiently(lambda p=p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=_TIMEOUT,
                                                                      cached=False), f"the offsets of {topic}[{p}]")
             for p in chosen}
    start_t = _offsets_for_time(consumer, topic, chosen, since_ms) if since_ms is not None else {}
    end_t = _offsets_for_time(consumer, topic, chosen, until_ms) if until_ms is not None else {}
    ranges = []
    for p in chosen:
        lo, hi = lo_hi[p]
        start, end = wanted.get(p, (None, None))
        # no record at or after a time edge: that edge is the snapshotted end
        start = max(lo, start if start is not None else lo, start_t.get(p, hi) if since_ms is not None else lo)
        end = min(hi, end if end is not None else hi, end_t.get(p, hi))
        ranges.append(PartitionRange(topic, p, start, max(start, end)))
    return ranges


def _offsets_for_time(consumer: Consumer, topic: str, parts: list[int], ts: int) -> dict[int, int]:
    """{partition: first offset with timestamp >= ts}; partitions with none are left out."""
    def ask():
        found = consumer.offsets_for_times([TopicPartition(topic, p, ts) for p in parts], timeout=_TIMEOUT)
        if err := next((tp.error for tp in found if tp.error is not None), None):
            raise KafkaException(err)
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}

    return _patiently(ask, f"the offsets of {topic} at {iso_ms(ts)}")


def _patiently(call, what: str, timeout: float = _TIMEOUT):
    """call(), asked again while the broker's answer is transient (see _TRANSIENT)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaException as e:
            err = e.args[0]
            if not isinstance(err, KafkaError) or err.code() not in _TRANSIENT or time.monotonic() > deadline:
                raise WindowError(f"cannot read {what}: {err}") from e
        time.sleep(0.1)


class WindowReader:
    """Iterates the records of a window in per-partition offset order, then stops.

    A (topic, partition) is done when a record at or past its end arrives (that record is
    not yielded) or when its end-of-file event reports a position at or past it; the EOF
    check matters for read_committed, where the last offsets before the end may be
    transaction markers that are never delivered."""

    def __init__(self, settings, window: Window, consumer_conf: dict | None = None, progress: bool = False,
                 consumer: Consumer | None = None):
        self.window = window
        self._own = consumer is None  # a consumer passed in is the caller's to close
        self.consumer = consumer or window_consumer(settings, **(consumer_conf or {}))
        self._end = {r.tp: r.end for r in window.ranges if r.size > 0}
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=window.total, unit="rec", desc=f"read {', '.join(window.topics)}",
                             dynamic_ncols=True, disable=None)  # None: no bar unless stderr is a terminal
        if self._end:
            self.consumer.incremental_assign([TopicPartition(r.topic, r.partition, r.start)
                                              for r in window.ranges if r.size > 0])

    def done(self) -> bool:
        return not self._end

    def reading(self) -> list[tuple[str, int]]:
        """The (topic, partition)s assigned and not read to their end: the ones a driver's
        back-pressure may pause and resume (consumer/flow.py steer); finished ones are unassigned."""
        return list(self._end)

    def poll(self, timeout: float = 0.5) -> list:
        """One consume() of up to 500 records inside the window ([] when none arrived)."""
        if not self._end:
            return []
        out = []
        for msg in consume_ready(self.consumer, 500, timeout):
            tp = (msg.topic(), msg.partition())
            end = self._end.get(tp)
            if end is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if msg.offset() >= end:
                        self._finish(tp)
                    continue
                if err.fatal() or not err.retriable():
                    raise KafkaException(err)
                continue
            if msg.offset() >= end:
                self._finish(tp)
                continue
            out.append(msg)
            if msg.offset() == end - 1:
                self._finish(tp)
        if self._bar is not None:
            self._bar.update(len(out))
        return out

    def _finish(self, tp: tuple[str, int]) -> None:
        del self._end[tp]
        # stop fetching it: records past the end would only be dropped here
        self.consumer.incremental_unassign([TopicPartition(*tp)])

    def __iter__(self) -> Iterator:
        while not self.done():
            yield from self.poll()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._own:
            self.consumer.close()


def read_window(settings, window: Window, *, consumer_conf: dict | None = None,
                progress: bool = False) -> Iterator:
    """Every record of the window (confluent_kafka.Message), read_committed, by manual
    assignment. Records are exactly the window's offsets; callers that want the time edges
    exact per record too (out-of-order producer timestamps) filter by since_ms/until_ms."""
    reader = WindowReader(settings, window, consumer_conf, progress)
    try:
        yield from reader
    finally:
        reader.close()


def settle(settings, topic: str, timeout: float = 15.0) -> None:
    """Wait until read_committed readers see the whole topic as it is now. A commit returns
    before the transaction markers are written, and until they are, the last stable offset
    (the end a read_committed window snapshots) stops short of the just-committed records."""
    raw, stable = window_consumer(settings, **{"isolation.level": "read_uncommitted"}), window_consumer(settings)
    try:
        parts = raw.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: raw.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1] for p in parts}
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            ends = {p: e for p, e in ends.items()
                    if stable.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1] < e}
            if ends:
                time.sleep(0.05)
    finally:
        raw.close()
        stable.close()

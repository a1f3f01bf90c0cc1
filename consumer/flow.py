"""Back-pressure, per tier: which fetched records enter the engine, which wait, and when a
tier's partitions pause.

FlowControl is pure: a driver (the worker, replay's readers) fetches, hands records to the
engine and pauses or resumes partitions as told here; `steer` is how every driver applies
those decisions to its consumer. It has two levels, per tier (a tier is its topic). At most
`max_in_flight` records of a tier are in the engine (tracked, decoded, batched, not yet
committed); what is fetched past that is held here as it came, undecoded, and handed over as
room appears. Only when the held records of a tier reach `max_in_flight` too is the tier
paused (resumed at half). Pausing
is the last resort: librdkafka drops a paused partition's prefetch, and a resumed partition
waited about a second for its next fetch with two group members (BENCHMARKS.md).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable

from confluent_kafka import TopicPartition

log = logging.getLogger(__name__)

FETCH_CHUNK = 256  # records per consume() call and per decode task


class FlowControl:
    """The held records and the paused state of each tier. `pending_in(tier)` is how many
    records of the tier the engine has; records are anything with topic() and partition()."""

    def __init__(self, settings, pending_in: Callable[[str], int]) -> None:
        self.s = settings
        self._pending_in = pending_in
        tiers = [settings.tier_of(t) for t in settings.request_topics]
        self.held: dict[str, deque] = {tier: deque() for tier in tiers}  # fetched past max_in_flight
        self.paused: dict[str, bool] = dict.fromkeys(tiers, False)
        self.stats = {"pauses": 0, "held": 0}

    @property
    def holding(self) -> int:
        """Records held, all tiers together."""
        return sum(map(len, self.held.values()))

    def is_paused(self, topic: str) -> bool:
        """Whether the tier of `topic` is paused: a partition of it assigned now starts paused."""
        return self.paused[self.s.tier_of(topic)]

    def in_flight(self, tier: str) -> int:
        """Records of `tier` in the engine."""
        return self._pending_in(tier)

    def _room(self, tier: str) -> int:
        return self.s.max_in_flight - self.in_flight(tier)

    def take(self, msgs: list) -> list:
        """The fetched records the engine takes now; the rest are held. A tier that holds
        anything holds everything after it, so each partition stays in order."""
        room = {tier: self._room(tier) for tier in self.held}
        if not any(self.held.values()) and len(msgs) <= min(room.values()):
            return msgs  # the common case: nothing held, room for all
        take = []
        for m in msgs:
            tier = self.s.tier_of(m.topic())
            if self.held[tier] or room[tier] <= 0:
                self.held[tier].append(m)
                self.stats["held"] += 1
            else:
                room[tier] -= 1
                take.append(m)
        return take

    def hand_over(self) -> list[list]:
        """Held records that now have room, in chunks of at most FETCH_CHUNK (one decode task
        each), in order; they are no longer held."""
        chunks = []
        for tier, held in self.held.items():
            n = min(len(held), self._room(tier)) if held else 0
            while n > 0:
                chunk = [held.popleft() for _ in range(min(n, FETCH_CHUNK))]
                n -= len(chunk)
                chunks.append(chunk)
        return chunks

    def drop(self, gone: set[tuple[str, int]] | None = None) -> int:
        """Forget held records (of `gone` partitions, or all): not tracked, never committed,
        so they are fetched again by whoever reads from the committed offsets."""
        dropped = 0
        for tier, held in self.held.items():
            keep = deque() if gone is None else deque(m for m in held if (m.topic(), m.partition()) not in gone)
            dropped += len(held) - len(keep)
            self.held[tier] = keep
        return dropped

    def decide(self, stopping: bool) -> tuple[set[str], set[str]]:
        """The tiers to pause and to resume now, marked so. A tier pauses when its held records
        reach max_in_flight as well, and resumes at half: a backlog of normal requests never
        holds high-priority ones back. A stopping worker fetches no more: every tier pauses,
        none resumes, and what was fetched is still answered."""
        if stopping:
            pause, resume = {t for t, p in self.paused.items() if not p}, set()
        else:
            limit = self.s.max_in_flight
            pause = {t for t, h in self.held.items() if not self.paused[t] and len(h) >= limit}
            resume = {t for t, h in self.held.items() if self.paused[t] and len(h) <= limit // 2}
            self.stats["pauses"] += len(pause)
        for tier in pause | resume:
            self.paused[tier] = tier in pause
        return pause, resume


def tier_partitions(settings, partitions: Iterable[tuple[str, int]], tier: str) -> list[TopicPartition]:
    """The partitions of `tier` among `partitions` ((topic, partition) keys)."""
    return [TopicPartition(t, p) for t, p in partitions if settings.tier_of(t) == tier]


def steer(flow: FlowControl, consumer, partitions: Iterable[tuple[str, int]], stopping: bool) -> None:
    """Apply `flow.decide(stopping)` to `consumer`: pause and resume the tiers it names, on each
    tier's partitions among `partitions`, the ones the driver reads now (the worker: all it owns;
    a replay reader: those not read to their end, whose fetching it stops itself). The same for
    a group member and for a consumer of manually assigned partitions."""
    pause, resume = flow.decide(stopping)
    if not pause and not resume:
        return
    partitions = list(partitions)
    for tier in pause | resume:
        tps = tier_partitions(flow.s, partitions, tier)
        if tps:
            (consumer.pause if tier in pause else consumer.resume)(tps)
        log.debug("%s %d %s-tier partitions (in flight: %d, held: %d)", "paused" if tier in pause else "resumed",
                  len(tps), tier, flow.in_flight(tier), len(flow.held[tier]))

"""The one commit path of every driver (the live worker, replay): what the engine finished
leaves it through a sink, one commit at a time.

Group commit: one commit runs on the emit thread while the worker's loop goes on fetching and
batching; when it ends, the next one takes everything finished meanwhile. Under light load a
result is committed as soon as it is ready; under heavy load the commits grow instead of
multiplying. `commit_interval_ms` sets a floor between them.

The emitter (consumer/emit.py) does one commit: exactly-once, a transaction carrying the
outputs and the consumed offsets; at-least-once, the outputs delivered and confirmed, whose
offsets this committer then commits from the loop thread (librdkafka's synchronous commit from
another thread was seen to block until the consumer closed). A commit that aborts rewinds the
worker to its last committed offsets; a fenced producer's FatalError stops it.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from confluent_kafka import KafkaException, TopicPartition

from inferlog.committed import committed_offsets, start_positions
from inferlog.errors import FatalError
from inferlog.request import now_ms

from .emit import CommitAborted, offsets_of
from .pipeline import InlineExecutor

log = logging.getLogger(__name__)


@dataclass(slots=True)
class InFlight:
    """The commit on the emit thread: its outputs and the offsets it covers."""
    future: Future
    outputs: list
    commits: dict
    t0: float


class Committer:
    """`sink`: where a commit goes - the worker's emitter (consumer/emit.py) or a replay's topic
    or file sink (replay/sinks.py): `commit(outputs, commits, group_metadata)`, and
    `transactional` (True: the sink keeps the offsets with the outputs; False: the committer
    commits them to the group once the outputs are delivered).
    `on_rewind()`: the driver forgets what it fetched but has not handed to the engine (held
    records); `on_commit(outputs, commits)`: after each commit (progress, demo, tests).
    `interval`: the least seconds between two commit starts (default commit_interval_ms);
    `inline`: each commit runs on the caller's thread (replay) instead of the emit thread.
    A sink that raises CommitAborted rewinds the driver to its last committed offsets; any
    other error (a fenced producer, a replay's ReplayError) comes out of step()."""

    def __init__(self, settings, consumer, engine, sink, metrics, *, on_rewind=None, on_commit=None,
                 interval: float | None = None, inline: bool = False):
        self.consumer, self.engine, self.sink, self.metrics = consumer, engine, sink, metrics
        self.on_rewind, self.on_commit = on_rewind, on_commit
        self.interval = settings.commit_interval_ms / 1000.0 if interval is None else interval
        self.last = time.monotonic()
        self.in_flight: InFlight | None = None
        self.stats = {"commits": 0, "aborts": 0}
        self.inline = inline
        self.pool = InlineExecutor() if inline else ThreadPoolExecutor(1, thread_name_prefix="inferlog-emit")

    @property
    def busy(self) -> bool:
        return self.in_flight is not None

    def step(self, force: bool = False, only: set | None = None) -> None:
        """Called every turn of the loop, and `force`d before partitions are given up (`only`
        those) or the worker stops: then the commit is over when this returns.

        1. A commit in flight that has not ended is left to run, unless forced (then waited for).
        2. An ended one is accounted for; an aborted one rewinds, and nothing more happens now.
        3. Not forced: nothing starts before commit_interval_ms since the last start.
        4. What the engine finished (of `only` partitions) is released and its commit starts on
           the emit thread, with the consumer's group metadata as of now (it fences zombies).
        5. Forced (or run inline): that commit is waited for and accounted for too."""
        if self.in_flight is not None:  # 1
            if not force and not self.in_flight.future.done():
                return
            if not self._ended():  # 2
                return
        if not force and time.monotonic() - self.last < self.interval:  # 3
            return
        outputs, commits = self.engine.release(only)  # 4
        if not commits:
            return
        self.last = time.monotonic()
        fut = self.pool.submit(self.sink.commit, outputs, commits, self.consumer.consumer_group_metadata())
        fut.add_done_callback(self.engine.wake)  # its end is work for the loop
        self.in_flight = InFlight(fut, outputs, commits, time.perf_counter())
        if force or self.inline:  # 5
            self._ended()

    def _ended(self) -> bool:
        """Account for the commit in flight (waiting for it); False if it aborted and the
        worker rewound. A fenced producer's FatalError propagates: the worker stops."""
        c, self.in_flight = self.in_flight, None
        try:
            c.future.result()
            if not self.sink.transactional:  # at-least-once: the offsets after the delivery
                self._commit_offsets(c.commits)
        except CommitAborted as e:
            self.stats["aborts"] += 1
            self.metrics.commits.labels("aborted").inc()
            log.warning("commit aborted (%s): rewinding to the last committed offsets", e)
            self.rewind()
            return False
        self.stats["commits"] += 1
        self.metrics.committed(c.outputs, now_ms(), time.perf_counter() - c.t0)
        if self.on_commit is not None:
            self.on_commit(c.outputs, c.commits)
        return True

    def _commit_offsets(self, commits: dict) -> None:
        """Synchronous, checking each partition's error."""
        try:
            done = self.consumer.commit(offsets=offsets_of(commits), asynchronous=False)
        except KafkaException as e:
            raise CommitAborted(f"offset commit failed: {e}") from e
        bad = [tp for tp in done or () if tp.error is not None]
        if bad:
            raise CommitAborted(f"offset commit failed for {bad}")

    def settle(self, timeout: float | None = None) -> None:
        """Wait until the commit in flight (if any) has ended, without accounting for it (the next
        step does). Before this process reads where a partition starts, or gives one up without
        committing: a commit still running could otherwise make its offsets the group's after the
        next owner (this process again, after a lost session) read the older ones, and that
        owner would answer those records a second time."""
        if self.in_flight is not None:
            wait([self.in_flight.future], timeout=timeout)

    def rewind(self) -> None:
        """Forget all uncommitted work and fetch again from the committed offsets.

        The committed offsets are read first, stable (inferlog/committed.py: asked again while a
        transaction settles or the coordinator is away, as when a broker restarts): a partition
        whose offset cannot be read must not restart from a policy (duplicates), and one whose
        seek fails must not go on from its fetch position (its uncommitted records would be
        skipped) - that worker stops instead."""
        starts = start_positions(committed_offsets(self.consumer, [TopicPartition(*tp) for tp in self.engine.partitions]))
        self.engine.reset()
        if self.on_rewind is not None:
            self.on_rewind()  # fetched past the committed offsets: they come again after the seek
        for tp in starts:
            try:
                self.consumer.seek(tp)
            except KafkaException as e:
                raise FatalError(f"cannot rewind {tp.topic}[{tp.partition}] to {tp.offset}: {e}") from e

    def close(self) -> None:
        """After the consumer closed. A commit still in flight (only after a fatal error) may
        end first; then the producer flushes what it holds."""
        if self.in_flight is not None:
            wait([self.in_flight.future], timeout=60)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.sink.close()

"""The worker process: a consumer-group member that turns requests into results.

One loop thread owns the Kafka clients (fetch, rebalance, pause/resume, commit) and drives
the engine (consumer/engine.py), whose CPU pool and device thread do the work.

Back-pressure, per tier, is decided in consumer/flow.py (which fetched records enter the
engine, which are held, when a tier pauses); this loop applies it to the consumer's partitions
(flow.steer, as replay's readers do).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from confluent_kafka import Consumer, KafkaError

from inferlog.clients import confluent_config, consume_ready, group_protocol_config
from inferlog.committed import committed_offsets, start_positions
from inferlog.codec import Codec
from inferlog.errors import FatalError, OffsetsUnreadable, RestartRequired
from inferlog.registry import Announcer

from .committer import Committer
from .emit import make_emitter
from .engine import Engine, start_up
from .flow import FETCH_CHUNK, FlowControl, steer, tier_partitions
from .membership import let_go
from .metrics import HealthServer, LagSampler, Metrics

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings, runner, *, codec: Codec | None = None, on_commit=None):
        self.s = settings
        self.runner = runner
        self.metrics = Metrics(model=settings.served_name)
        self.engine = Engine(settings, runner, codec, metrics=self.metrics)
        self.on_commit = on_commit  # callback(outputs) after each successful commit (demo, tests)
        self.flow = FlowControl(settings, lambda tier: self.engine.pending_in(settings.tier_topic(tier)))
        self.stopping = threading.Event()
        self.closing = False
        self.ready = threading.Event()  # model warm and partitions assigned (readiness)
        self.consumer: Consumer | None = None
        self.committer: Committer | None = None
        self.lag: LagSampler | None = None
        self.announcer: Announcer | None = None  # the model's record on models_topic, while serving
        self.last_turn = time.monotonic()
        self.last_sample = 0.0
        self.http: HealthServer | None = None
        if settings.metrics_port:
            self.http = HealthServer(settings.metrics_port, self.metrics, self._alive, self._ready).start()

    # -- health ----------------------------------------------------------------------------
    def _alive(self) -> tuple[bool, str]:
        age = time.monotonic() - self.last_turn
        # generous: recovering from a broker restart can block the loop for a minute or two
        return age < 180.0, f"last loop turn {age:.1f}s ago"

    def _ready(self) -> tuple[bool, str]:
        if self.ready.is_set():
            return True, f"{len(self.engine.partitions)} partitions assigned"
        return False, "warming up or waiting for partitions"

    @property
    def counts(self) -> dict:
        commits = self.committer.stats if self.committer else {"commits": 0, "aborts": 0}
        return {**self.engine.counts, **commits, **self.flow.stats}

    @property
    def paused(self) -> dict[str, bool]:
        """Whether each tier is paused by back-pressure (tests wait for it)."""
        return self.flow.paused

    # -- lifecycle -----------------------------------------------------------------------
    def stop(self, *_):
        if not self.stopping.is_set():
            log.info("stop requested: finishing in-flight work, then leaving the group")
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _connect(self) -> None:
        conf = confluent_config(self.s, **{
            "group.id": self.s.worker_group,
            "client.id": f"inferlog-{self.s.worker_id}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # never a policy: every partition starts where the group committed, read by the
            # worker itself (_on_assign); an offset that is out of range stops it loudly
            "auto.offset.reset": "error",
            "isolation.level": "read_committed",
            **group_protocol_config(self.s),
            "max.poll.interval.ms": 300000,
            # how long the broker holds a fetch that finds nothing: a partition resumed after
            # back-pressure waits for the fetch in flight, so librdkafka's 500 ms default cost
            # more than half the echo throughput (BENCHMARKS.md); an idle worker asks 20x/s
            "fetch.wait.max.ms": self.s.fetch_wait_max_ms,
            # librdkafka's prefetch defaults stay: a 4 MB cap measured at half the throughput
            # (its fetch.queue.backoff.ms holds a partition's next fetch once the queue is full)
        })
        self.consumer = Consumer(conf)
        emitter = make_emitter(self.s, self.consumer, fallback=self.engine.builder.unwritable)
        self.committer = Committer(self.s, self.consumer, self.engine, emitter, self.metrics,
                                   on_rewind=self.flow.drop, on_commit=self._committed)
        self.lag = LagSampler(self.s, self.metrics.lag)
        self.consumer.subscribe(list(self.s.request_topics), on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        # warm and a member of the group: what is published for this model from now on is ours
        # (or a fellow member's) to answer, so say so (inferlog/registry.py)
        self.announcer = Announcer.for_runner(self.s, self.runner).start()

    def run(self) -> int:
        """Serve until stopped. Returns the process exit code."""
        log.info("warming up model %s on %s", self.runner.info.name, self.runner.device)
        self.last_turn = time.monotonic()
        start_up(self.s, self.runner)
        try:
            self._connect()
            log.info("worker %s serving %s joined group %s on %s (delivery %s)", self.s.worker_id,
                     self.s.served_name, self.s.worker_group, " and ".join(self.s.request_topics), self.s.delivery)
            while True:
                self._step()
                if self.stopping.is_set() and self.engine.state().drained:
                    break
            self._commit(force=True)
            log.info("drained: %s", self.counts)
            self._withdraw(tombstone=True)  # a clean stop: the model's record goes at once
            return 0
        except FatalError as e:
            if isinstance(e, RestartRequired):  # 75: the CLI starts the process again
                log.warning("restart needed: %s", e)
            else:
                log.error("fatal: %s", e)
            return e.exit_code
        except OffsetsUnreadable as e:  # where a partition starts (or rewinds to) is unknown: stop, never guess
            log.error("fatal: %s", e)
            return FatalError.exit_code
        finally:
            self._close()

    def _withdraw(self, tombstone: bool) -> None:
        if self.announcer is not None:
            self.announcer.stop(tombstone=tombstone)
            self.announcer = None

    def _close(self) -> None:
        self._set_ready(False)
        # any other way out (fenced, a restart under the same id, a broken device) leaves the record
        # to expire: a successor under this worker id may be announcing under the same key already
        self._withdraw(tombstone=False)
        self.closing = True  # revocation during close only lets go: nothing is left to commit
        if self.http is not None:
            self.http.stop()
        if self.consumer is not None:
            try:
                self.consumer.close()  # leaves the group: partitions move at once
            except Exception as e:  # never let a failing close turn exit 3 into a traceback
                log.warning("consumer close: %s", e)
        self.engine.close()
        if self.lag is not None:
            self.lag.close()
        if self.committer is not None:
            self.committer.close()

    # -- one turn of the loop ------------------------------------------------------------
    def _step(self) -> None:
        stopping = self.stopping.is_set()
        # back-pressure (decided in flow.py), before fetching: a stopping worker fetches no more
        steer(self.flow, self.consumer, self.engine.partitions, stopping)
        # a commit's end is work (the next one can start): fetching blocks briefly meanwhile
        self.engine.turn(self._fetch, flush=stopping, soon=self.committer.busy)  # FatalError: stop
        self._commit()
        self.last_turn = time.monotonic()
        if self.last_turn - self.last_sample > 2.0:
            self._sample()

    def _fetch(self, timeout: float):
        """What the engine takes this turn: the fetched records it has room for, then held
        ones that have room now (none while stopping: they are fetched again by the next owner).
        A generator: the room for held records is weighed after the fetched ones are in."""
        msgs = consume_ready(self.consumer, FETCH_CHUNK, timeout)
        if msgs:
            yield self.flow.take(list(self._records(msgs)))
        if not self.stopping.is_set():
            yield from self.flow.hand_over()

    def _committed(self, outputs, _commits) -> None:
        if self.on_commit is not None:  # read at each commit: it may be set after start
            self.on_commit(outputs)

    def _sample(self) -> None:
        """Gauges that are read, not counted: lag, in-flight, device memory."""
        self.last_sample = time.monotonic()
        m = self.metrics
        m.in_flight.set(self.engine.pending)
        for tier, held in self.flow.held.items():
            m.held.labels(tier).set(len(held))
        for tier, paused in self.flow.paused.items():
            m.paused.labels(tier).set(len(tier_partitions(self.s, self.engine.partitions, tier)) if paused else 0)
        m.sample_device(self.runner.device)
        if self.lag is not None and self.engine.partitions:
            self.lag.sample(sorted(self.engine.partitions))  # answered on the sampler's thread

    def _set_ready(self, ready: bool) -> None:
        (self.ready.set if ready else self.ready.clear)()
        self.metrics.ready.set(1 if ready else 0)

    def _records(self, msgs):
        for m in msgs:
            err = m.error()
            if err is None:
                yield m
            elif err.code() == KafkaError._AUTO_OFFSET_RESET:
                raise FatalError(f"consumer: {err} (the committed offset of {m.topic()}[{m.partition()}] is "
                                 "not in the log any more: records were deleted before they were answered)")
            elif err.code() != KafkaError._PARTITION_EOF:
                if err.fatal():
                    raise FatalError(f"consumer: {err}")
                log.warning("consumer error: %s", err)

    def _commit(self, force: bool = False, only: set | None = None) -> None:
        self.committer.step(force, only)  # consumer/committer.py

    # -- rebalance callbacks (run inside consume(), on the loop thread) -------------------
    def _on_assign(self, consumer, partitions) -> None:
        if self.closing:
            # leaving: a partition handed over now (a fellow member left too) is not taken. Its
            # committed offsets are not read either: a closing consumer's read timed out again
            # and again, and the worker spent up to 180 s in close (a chaos run's stop_all gave
            # up on it). The group gives it to whoever stays once this member has left.
            if partitions:
                log.info("assigned %s while leaving: not taken", _named(partitions))
            return
        # where each starts: the group's committed offset, read stable (a transaction the
        # previous owner left open settles first), never librdkafka's guess (inferlog/committed.py);
        # this worker's own commit in flight ends first (it may hold offsets of these partitions,
        # when they come back after a lost session)
        t0 = time.monotonic()
        self.committer.settle()
        starts = start_positions(committed_offsets(consumer, partitions))
        waited = time.monotonic() - t0
        for tp in partitions:
            self.engine.assign((tp.topic, tp.partition))
        if partitions:  # the consumer protocol also calls with none
            log.info("assigned %s%s", _named(starts),
                     f" (their committed offsets settled after {waited:.1f}s)" if waited >= 1.0 else "")
        consumer.incremental_assign(starts)
        paused = [tp for tp in partitions if self.flow.is_paused(tp.topic)]
        if paused:
            consumer.pause(paused)
        if self.engine.partitions:
            self._set_ready(True)

    def _on_revoke(self, consumer, partitions) -> None:
        self._give_up(consumer, partitions, commit_first=True)

    def _on_lost(self, consumer, partitions) -> None:
        self._give_up(consumer, partitions, commit_first=False)

    def _give_up(self, consumer, partitions, commit_first: bool) -> None:
        gone, dropped = let_go(consumer, partitions, self.engine, self.committer, commit_first=commit_first,
                               closing=self.closing)
        dropped += self.flow.drop(gone)
        if not self.engine.partitions:
            self._set_ready(False)
        for t, p in gone:  # a partition no longer ours has no lag of ours
            if self.lag is not None:
                self.lag.forget(t, p)
        log.info("revoked %s (%d in-flight records dropped, to be redone by the next owner)",
                 _named(partitions), dropped)


def _named(partitions) -> str:
    """"inferlog.requests[0,2] inferlog.requests.high[1]": partitions by topic, for the log."""
    by: dict[str, list[int]] = {}
    for tp in partitions:
        by.setdefault(tp.topic, []).append(tp.partition)
    return " ".join(f"{t}[{','.join(map(str, sorted(ps)))}]" for t, ps in sorted(by.items())) or "nothing"

"""The worker process: a consumer-group member that turns requests into results.

One loop thread owns the Kafka clients (fetch, rebalance, pause/resume, commit). CPU work
(decode, tokenize, pad, postprocess, encode) runs on a sized pool, the model on one device
thread; they hand finished work back through a queue. Everything between fetch and commit
is bounded by `max_in_flight` records: above it the worker pauses its partitions.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Empty, SimpleQueue

from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

from inferlog.clients import confluent_config
from inferlog.codec import Codec
from inferlog.errors import FatalError
from inferlog.request import Limits, now_ms

from .batching import BatchPolicy, Item
from .emit import CommitAborted, make_emitter
from .offsets import OffsetTracker
from .pipeline import Pipeline
from .stages import Decoder, Pending, ResultBuilder, is_expired

log = logging.getLogger(__name__)

FETCH_CHUNK = 256  # records per consume() call and per decode task


class Worker:
    def __init__(self, settings, runner, *, codec: Codec | None = None, on_commit=None):
        self.s = settings
        self.runner = runner
        self.codec = codec or Codec.from_settings(settings)
        self.on_commit = on_commit  # callback(outputs) after each successful commit (demo, tests)
        self.tracker = OffsetTracker()
        self.policy = BatchPolicy(settings.max_batch_size, settings.max_batch_tokens, settings.max_wait_ms)
        self.builder = ResultBuilder(self.codec, settings, runner.info)
        names = {runner.info.name, settings.model} | ({settings.model_name} if settings.model_name else set())
        self.decoder = Decoder(self.codec, runner, Limits.from_settings(settings), settings.max_input_tokens, names)
        self.cpu = ThreadPoolExecutor(settings.cpu_workers, thread_name_prefix="inferlog-cpu")
        self.device = ThreadPoolExecutor(1, thread_name_prefix="inferlog-device")
        self.done: SimpleQueue = SimpleQueue()
        from .runners import Row  # the runner module owns the row type

        self.pipeline = Pipeline(runner, self.cpu, self.device, self.builder, self.done,
                                 settings.default_max_new_tokens, Row)
        self.decoding: deque[Future] = deque()
        self.paused = False
        self.stopping = threading.Event()
        self.ready = threading.Event()  # model warm and partitions assigned (readiness)
        self.last_commit = time.monotonic()
        self.commit_interval = settings.commit_interval_ms / 1000.0
        self.counts = {"consumed": 0, "results": 0, "dead_letters": 0, "commits": 0, "aborts": 0, "pauses": 0}
        self.consumer: Consumer | None = None
        self.emitter = None

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
            "group.id": self.s.group_id,
            "client.id": f"inferlog-{self.s.worker_id}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": self.s.session_timeout_ms,
            "max.poll.interval.ms": 300000,
        })
        self.consumer = Consumer(conf)
        self.emitter = make_emitter(self.s, self.consumer)
        self.consumer.subscribe([self.s.requests_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)

    def run(self) -> int:
        """Serve until stopped. Returns the process exit code."""
        log.info("warming up model %s on %s", self.runner.info.name, self.runner.device)
        self.runner.warmup()
        self._connect()
        log.info("worker %s joined group %s on %s (delivery %s)", self.s.worker_id, self.s.group_id,
                 self.s.requests_topic, self.s.delivery)
        try:
            while True:
                self._step()
                if self.stopping.is_set() and self._drained():
                    break
            self._commit(force=True)
            log.info("drained: %s", self.counts)
            return 0
        except FatalError as e:
            log.error("fatal: %s", e)
            return 3
        finally:
            self._close()

    def _close(self) -> None:
        self.cpu.shutdown(wait=False, cancel_futures=True)
        self.device.shutdown(wait=False, cancel_futures=True)
        if self.consumer is not None:
            try:
                self.consumer.close()  # leaves the group: partitions move at once
            except KafkaException as e:
                log.warning("consumer close: %s", e)
        if self.emitter is not None:
            self.emitter.close()

    def _drained(self) -> bool:
        return (not self.decoding and len(self.policy) == 0 and self.pipeline.in_flight == 0
                and self.done.empty() and self.tracker.pending == 0)

    # -- one turn of the loop ------------------------------------------------------------
    def _step(self) -> None:
        if self.stopping.is_set() and not self.paused:
            self._pause(True)  # stop fetching; what was fetched is still answered
        msgs = self.consumer.consume(FETCH_CHUNK, self._poll_timeout())
        if msgs:
            self._accept(msgs)
        self._collect_decoded()
        self._collect_finished()
        self._dispatch()
        self._commit()
        self._flow_control()

    def _poll_timeout(self) -> float:
        busy = self.decoding or self.pipeline.in_flight or not self.done.empty() or self.tracker.pending
        if not busy and len(self.policy) == 0:
            return 0.1
        due = self.policy.due_at()
        wait = 0.005 if due is None else max(0.0, min(0.005, due - time.monotonic()))
        return wait

    def _accept(self, msgs) -> None:
        chunk: list[Pending] = []
        now, mono = now_ms(), time.monotonic()
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    if err.fatal():
                        raise FatalError(f"consumer: {err}")
                    log.warning("consumer error: %s", err)
                continue
            tp = (m.topic(), m.partition())
            epoch = self.tracker.track(tp, m.offset())
            if epoch is None:  # not (or no longer) ours
                continue
            self.counts["consumed"] += 1
            chunk.append(Pending(m.topic(), m.partition(), m.offset(), epoch, m.key(), m.value(),
                                 m.headers(), now, mono))
        if chunk:
            self.decoding.append(self.cpu.submit(self.decoder, chunk))

    def _collect_decoded(self) -> None:
        while self.decoding and self.decoding[0].done():
            for p in self.decoding.popleft().result():
                if not self.tracker.owns(p.tp, p.epoch):
                    continue
                if p.error is not None:
                    self._complete(p, [self.builder.dead_letter(p, p.error)])
                elif is_expired(p):
                    self._complete(p, [self.builder.expired(p)])
                else:
                    extra = 0
                    if self.runner.task == "GENERATE":
                        extra = p.request.parameters.max_new_tokens or self.s.default_max_new_tokens
                    self.policy.add(Item(p, len(p.ids), max(map(len, p.ids)), p.arrived, extra))

    def _dispatch(self) -> None:
        flush = self.stopping.is_set()
        while self.pipeline.in_flight < self.s.pipeline_depth:
            items = self.policy.next_batch(time.monotonic(), flush=flush)
            if not items:
                return
            batch, now = [], now_ms()
            for it in items:
                p = it.ref
                if is_expired(p, now):  # expired while queued: answer without the model
                    self._complete(p, [self.builder.expired(p)])
                else:
                    batch.append(p)
            if batch:
                self.pipeline.submit(batch)

    def _collect_finished(self) -> None:
        while True:
            try:
                done = self.done.get_nowait()
            except Empty:
                return
            for p, outs in done:
                self._complete(p, outs)

    def _complete(self, p: Pending, outs) -> None:
        if self.tracker.complete(p.tp, p.offset, p.epoch, outs):
            for o in outs:
                self.counts["dead_letters" if o.topic == self.s.deadletter_topic else "results"] += 1

    # -- commit --------------------------------------------------------------------------
    def _commit(self, force: bool = False, only: set | None = None) -> None:
        if not force and time.monotonic() - self.last_commit < self.commit_interval:
            return
        outputs, commits = self.tracker.release(only)
        self.last_commit = time.monotonic()
        if not commits:
            return
        try:
            self.emitter.commit(outputs, commits)
        except CommitAborted as e:
            self.counts["aborts"] += 1
            log.warning("commit aborted (%s): rewinding to the last committed offsets", e)
            self._rewind()
            return
        self.counts["commits"] += 1
        if self.on_commit is not None:
            self.on_commit(outputs)

    def _rewind(self) -> None:
        """Forget all uncommitted work and fetch again from the committed offsets."""
        tps = self.tracker.partitions
        for tp in tps:
            self.tracker.revoke(tp)
            self.tracker.assign(tp)  # new epoch: work still in the pipeline is ignored
        self.policy.remove(lambda it: True)
        committed = self.consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=30)
        for tp in committed:
            off = tp.offset if tp.offset != OFFSET_INVALID else OFFSET_BEGINNING
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, off))

    # -- back-pressure -------------------------------------------------------------------
    def _flow_control(self) -> None:
        if self.stopping.is_set():
            return
        pending = self.tracker.pending
        if not self.paused and pending >= self.s.max_in_flight:
            self.counts["pauses"] += 1
            self._pause(True)
        elif self.paused and pending <= self.s.max_in_flight // 2:
            self._pause(False)

    def _pause(self, pause: bool) -> None:
        tps = [TopicPartition(t, p) for t, p in self.tracker.partitions]
        if tps:
            (self.consumer.pause if pause else self.consumer.resume)(tps)
        self.paused = pause
        log.debug("%s %d partitions (in flight: %d)", "paused" if pause else "resumed", len(tps),
                  self.tracker.pending)

    # -- rebalance callbacks (run inside consume(), on the loop thread) -------------------
    def _on_assign(self, consumer, partitions) -> None:
        for tp in partitions:
            self.tracker.assign((tp.topic, tp.partition))
        log.info("assigned %s", sorted(tp.partition for tp in partitions))
        consumer.incremental_assign(partitions)
        if self.paused:
            consumer.pause(partitions)
        if self.tracker.partitions:
            self.ready.set()

    def _on_revoke(self, consumer, partitions) -> None:
        self._give_up(consumer, partitions, commit_first=True)

    def _on_lost(self, consumer, partitions) -> None:
        self._give_up(consumer, partitions, commit_first=False)

    def _give_up(self, consumer, partitions, commit_first: bool) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        if commit_first:
            # what is finished for these partitions is committed while the generation is
            # still ours; what is not is dropped and redone by the next owner
            self._collect_finished()
            try:
                self._commit(force=True, only=gone)
            except FatalError:
                raise
        dropped = sum(self.tracker.revoke(tp) for tp in gone)
        if not self.tracker.partitions:
            self.ready.clear()
        self.policy.remove(lambda it: it.ref.tp in gone)
        log.info("revoked %s (%d in-flight records dropped, to be redone by the next owner)",
                 sorted(p for _, p in gone), dropped)
        consumer.incremental_unassign(partitions)

"""The engine: consumed records in, outputs ready to commit out.

decode (CPU pool) -> batch (policy) -> prepare/infer/finish (pipeline) -> offset bookkeeping.
It owns no Kafka client: the live worker feeds it from its consumer group and commits with
transactions; replay feeds it from a manually assigned window and writes to a topic or a
file. Both therefore answer a record the same way. Driven from one thread (the caller's
loop); the executors hand their work back through a queue.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Empty, SimpleQueue

from inferlog.codec import Codec
from inferlog.errors import FatalError
from inferlog.request import Limits, now_ms

from .batching import Item, Pace, TieredPolicy
from .metrics import Metrics
from .offsets import OffsetTracker
from .pipeline import InlineExecutor, Pipeline, Stages
from .decoding import DecodeStage, Decoder
from .records import Pending, is_expired
from .results import ResultBuilder
from .runners import share_cores

log = logging.getLogger(__name__)


def start_up(settings, runner) -> None:
    """What a driver does once, before it joins or reads: the model's CPU threads, its warm-up,
    then the heap settled (process-wide, so never in an Engine's constructor)."""
    share_cores(settings, runner)
    runner.warmup()
    settle_heap()


def settle_heap() -> None:
    """Collect once, then exempt every object alive now (the model, torch, transformers: ~440k
    objects with the default model) from the collector's full passes. A full pass over them
    took ~190 ms here holding the GIL (gc.collect() after loading the model), stopping the
    loop, the stages and the commit together. What is created later, requests and batches, is
    collected as usual."""
    gc.collect()
    gc.freeze()


@dataclass(frozen=True, slots=True)
class EngineState:
    pending: int  # records tracked and not yet released for commit
    running: bool  # work on the CPU pool or the device, or finished and not yet collected
    queued: int  # decoded records waiting in the batching queue

    @property
    def busy(self) -> bool:
        return bool(self.running or self.pending or self.queued)

    @property
    def drained(self) -> bool:
        return not self.busy


class Engine:
    def __init__(self, settings, runner, codec: Codec | None = None, replay_run_id: str | None = None,
                 metrics: Metrics | None = None, any_model: bool = False, honor_deadlines: bool = True):
        self.s = settings
        self.metrics = metrics or Metrics()
        # replay runs old requests on purpose: their deadlines passed long ago
        self.honor_deadlines = honor_deadlines
        self.runner = runner
        self.codec = codec or Codec.from_settings(settings)
        self.tracker = OffsetTracker()
        self.continuous = settings.generation == "continuous" and getattr(runner, "supports_continuous", False)
        pace = (Pace(settings.max_batch_size, settings.max_wait_ms, settings.latency_target_ms)
                if settings.batching == "adaptive" and not self.continuous else None)
        self.policy = TieredPolicy(settings.max_batch_size, settings.max_batch_tokens, settings.max_wait_ms,
                                   settings.high_priority_weight, pace)
        self.builder = ResultBuilder(self.codec, settings, runner.info, replay_run_id)
        # any_model (replay): a request that named the live model is answered by the chosen one
        names = None if any_model else (
            {runner.info.name, settings.model} | ({settings.model_name} if settings.model_name else set()))
        self.decoder = Decoder(self.codec, runner, Limits.from_settings(settings), settings.max_input_tokens, names)
        inline = settings.stages == "inline"
        self.cpu = InlineExecutor() if inline else ThreadPoolExecutor(settings.cpu_workers,
                                                                      thread_name_prefix="inferlog-cpu")
        self.done: SimpleQueue = SimpleQueue()
        # set by whatever ends work the loop waits for (a job, a decode, the driver's commit);
        # waited on and cleared by the loop only (wait())
        self.wakeup = threading.Event()
        self.costs: SimpleQueue = SimpleQueue()  # (rows, device seconds) per static batch, for `pace`
        from .runners import Row  # the runner module owns the row type

        runner.default_max_new_tokens = settings.default_max_new_tokens
        # the engine asks both pipelines what Stages says; the rest only of the one that has it
        # (continuous: pump, cancel, fits, kv_need; static: device_free, and its costs)
        self.pipeline: Stages
        if self.continuous:  # rows join and leave the running batch: consumer/continuous.py
            from .continuous import ContinuousPipeline

            self.pipeline = ContinuousPipeline(runner, self.builder, self.done, self.metrics,
                                               settings.max_batch_size, settings.max_batch_tokens, self.wakeup)
        else:
            self.pipeline = Pipeline(runner, self.cpu, self.builder, self.done, Row, self.metrics, inline=inline,
                                     wakeup=self.wakeup, costs=self.costs)  # starts the device loop (unless inline)
        self.decoding = DecodeStage(self.decoder, self.cpu, self.metrics, self.wake)
        self.counts = {"consumed": 0, "results": 0, "dead_letters": 0}

    # -- in ------------------------------------------------------------------------------
    def accept(self, msgs) -> int:
        """Track and queue for decoding the records (confluent Messages) that are ours."""
        chunk: list = []  # (message, epoch): the Pending is built on the pool, not on this loop
        now, mono = now_ms(), time.monotonic()
        for m in msgs:
            tp = (m.topic(), m.partition())
            try:
                epoch = self.tracker.track(tp, m.offset())
            except ValueError as e:
                # the partition's log went backwards (e.g. truncated after an unclean leader
                # election): start its bookkeeping afresh from here rather than crash
                log.warning("%s; restarting the bookkeeping of %s[%d]", e, *tp)
                self.revoke({tp})
                self.tracker.assign(tp)
                epoch = self.tracker.track(tp, m.offset())
            if epoch is None:  # not (or no longer) ours
                continue
            chunk.append((m, epoch))
        if chunk:
            self.counts["consumed"] += len(chunk)
            self.metrics.consumed.inc(len(chunk))
            self.decoding.submit(chunk, now, mono)
        return len(chunk)

    # -- one turn --------------------------------------------------------------------------
    def turn(self, fetch, flush: bool = False, soon: bool = False) -> None:
        """One turn of a driver's loop, the worker's and replay's alike: wait while the pipeline
        is full and nothing finished; fetch, blocking no longer than the work allows
        (`fetch(timeout)` yields chunks of records, one decode task each, and each is accepted
        before the next is asked for: a driver's room counts what it handed over); move the
        work along. `soon`: something of the driver's ends soon (a commit in flight), so
        fetching blocks 5 ms at most. `flush`: cut what is queued now. Raises FatalError once
        the device failed."""
        self.wait(0.005)
        timeout = self.poll_timeout()
        if soon:
            timeout = min(timeout, 0.005)
        for chunk in fetch(timeout):
            self.accept(chunk)
        self.step(flush=flush)

    def step(self, flush: bool = False) -> None:
        """Move work along without blocking: decoded -> batches -> pipeline; finished -> tracker.
        Raises FatalError once the device has failed: every driver (worker, replay) stops on it."""
        self._collect_decoded()
        self._collect_finished()
        if self.pipeline.fatal is not None:
            raise FatalError(f"the device failed: {self.pipeline.fatal}")
        self._dispatch(flush)

    def collect(self) -> None:
        """Take in finished work without starting new batches (e.g. before a revocation)."""
        self._collect_decoded()
        self._collect_finished()

    def _collect_decoded(self) -> None:
        for p in self.decoding.ready():
            if not self.tracker.owns(p.tp, p.epoch):
                continue
            if p.error is not None:
                self._complete(p, [self.builder.dead_letter(p, p.error)])
            elif self.honor_deadlines and is_expired(p):
                self._complete(p, [self.builder.expired(p)])
            else:
                extra = self.runner.new_tokens(p.request.parameters)  # what the runner's cost counts
                d = p.request.deadline
                deadline = None if d is None else p.arrived + (d - p.consumed_at) / 1000
                self.policy.add(Item(p, len(p.ids), max(map(len, p.ids)), p.arrived, extra, deadline),
                                high=self.s.tier_of(p.topic) == "high")  # a tier is its topic

    def _dispatch(self, flush: bool) -> None:
        if self.continuous:
            self.pipeline.pump()  # admits retries and collects what the manager finished
        pace = self.policy.pace
        while not self.costs.empty():  # what the device's batches cost (adaptive batching's model of it)
            rows, seconds = self.costs.get_nowait()
            if pace is not None:
                pace.ran(rows, seconds)
        while self.pipeline.has_room(self.s.pipeline_depth):
            items = self._admit() if self.continuous else \
                self.policy.next_batch(time.monotonic(), flush=flush, idle=self.pipeline.device_free)
            if not items:
                return
            batch, now, mono = [], now_ms(), time.monotonic()
            queue = self.metrics.stage.labels("queue")
            for it in items:
                queue.observe(mono - it.arrived)
                p = it.ref
                if self.honor_deadlines and is_expired(p, now):  # expired while queued: no model
                    self._complete(p, [self.builder.expired(p)])
                else:
                    batch.append(p)
            if batch:
                self.metrics.tokens.inc(sum(len(ids) for p in batch for ids in p.ids))
                self.pipeline.submit(batch)

    def _admit(self) -> list[Item]:
        """Continuous batching: what the running batch has room for now, whatever its size."""
        pipe, rows, kv = self.pipeline, 0, 0

        def fits(it: Item) -> bool:
            nonlocal rows, kv
            need = pipe.kv_need(it.ref)
            # an empty batch takes any request (one that can never fit the cache is a dead letter)
            if not (pipe.fits(rows + it.rows, kv + need) or (rows == 0 and pipe.in_flight == 0)):
                return False
            rows, kv = rows + it.rows, kv + need
            return True

        return self.policy.admit(fits)

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
                self.counts["dead_letters" if o.dead else "results"] += 1

    # -- out -------------------------------------------------------------------------------
    def release(self, only: set | None = None):
        """Outputs whose offsets may now be committed, and those offsets."""
        return self.tracker.release(only)

    # -- partitions ------------------------------------------------------------------------
    def assign(self, tp) -> None:
        self.tracker.assign(tp)

    def revoke(self, tps: set) -> int:
        """Drop every trace of these partitions; returns the unreleased records dropped."""
        dropped = sum(self.tracker.revoke(tp) for tp in tps)
        self.policy.remove(lambda it: it.ref.tp in tps)
        if self.continuous:  # their rows leave the running batch (static batches run to their
            self.pipeline.cancel(lambda p: p.tp in tps)  # end: the tracker's epochs drop them)
        return dropped

    def reset(self) -> list:
        """Forget all unreleased work (after an aborted commit); returns the partitions."""
        tps = self.tracker.partitions
        for tp in tps:
            self.tracker.revoke(tp)
            self.tracker.assign(tp)  # new epoch: work still in the pipeline is ignored
        self.policy.remove(lambda it: True)
        if self.continuous:
            self.pipeline.cancel(lambda p: True)
        return tps

    # -- state -----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return self.tracker.pending

    def pending_in(self, topic: str) -> int:
        return self.tracker.pending_in(topic)

    @property
    def partitions(self) -> list:
        return self.tracker.partitions

    def state(self) -> "EngineState":
        """What the drivers read to decide (fetch more, commit, stop): one snapshot."""
        running = bool(self.decoding or self.pipeline.in_flight or not self.done.empty())
        return EngineState(self.tracker.pending, running, len(self.policy))

    def all_ready(self) -> bool:
        """Every tracked record finished in order: one commit would release them all."""
        return self.tracker.ready_count() == self.tracker.pending

    def drop_queued(self) -> int:
        """Forget the batching queue (a driver that stops soon): those records stay tracked and
        uncommitted, so whoever reads from the committed offsets does them."""
        return len(self.policy.remove(lambda it: True))

    def poll_timeout(self, idle: float = 0.1) -> float:
        """How long the caller may block fetching without holding back work it could do.

        Zero only when a batch is due and the pipeline has room for it; a due batch that
        cannot be sent yet waits for a slot (see wait), spinning would only take the model's CPU."""
        if not self.state().busy:
            return idle
        if not self.pipeline.has_room(self.s.pipeline_depth):
            return 0.0  # the caller waits on wait() instead, which a finished job ends at once
        if self.continuous:  # each turn admits what has room; the rest waits for a row to finish
            return 0.005  # (not 0 while requests wait for cache room: that loop would starve generation)
        now = time.monotonic()
        due = self.policy.due_at(now, self.pipeline.device_free)
        return 0.005 if due is None else max(0.0, min(0.005, due - now))

    def wait(self, timeout: float) -> None:
        """Block until a job or a decode finishes (or `timeout`), when the pipeline is full:
        reacting at once to a free slot, instead of after a fixed poll interval."""
        if not self.pipeline.has_room(self.s.pipeline_depth) and not self.decoding.head_done:
            self.wakeup.wait(timeout)
        self.wakeup.clear()

    def wake(self, *_) -> None:
        """Something the loop waits for ended (also a future's done callback)."""
        self.wakeup.set()


    def close(self) -> None:
        self.pipeline.close()  # work still in flight is abandoned, not dead-lettered
        self.cpu.shutdown(wait=False, cancel_futures=True)

"""The model stages of a batch: prepare (CPU pool) -> run (the device loop) -> finish (CPU pool).

Each stage is a function that hands its job on explicitly: prepare puts it on the device
queue; the device loop, one thread of its own (the model is always called from the same
thread), takes jobs from that queue one at a time and hands each to the CPU pool to finish;
finish delivers the outputs to the engine's `done` queue. No thread ever waits for another
stage (the thread-pool starvation the seed notes warn about), and the engine bounds the work
in flight to `pipeline_depth` batches, so the device queue never holds more. While the device
runs batch k, batch k+1 is prepared and batch k-1 finished. A batch that fails in any stage
is split in halves and retried, down to the single request, which alone becomes a dead
letter: one bad request never takes its batch-mates with it. A device out-of-memory error
splits too; a broken device stops the driver (`fatal`, raised by Engine.step).

With `stages = "inline"` the same stage functions run one after the other on the driver's
thread (InlineExecutor, no device loop): for a model whose work is short and holds the GIL
(rules, lookups, a tiny CPU model), the threads only add hand-offs between cores under one GIL
(BENCHMARKS.md, issue 17: 45 vs 75 CPU µs per record for the echo model).
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Link
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from inferlog.errors import ModelError, RecordError

from .metrics import Metrics
from .records import BatchInfo, Out, Pending, new_batch_id
from .results import ResultBuilder

log = logging.getLogger(__name__)
tracer = trace.get_tracer("inferlog.worker")
_propagator = TraceContextTextMapPropagator()


@dataclass(slots=True)
class Job:
    batch: list[Pending]
    batch_id: str
    info: BatchInfo | None = None  # set by prepare, with the batch's padded cost
    rows: list[Any] = field(default_factory=list)
    prepared: Any = None
    raw: Any = None
    infer_ms: float = 0.0
    depth: int = 0  # how many times this work was split
    ahead: bool = True  # not yet past the device (prepared, queued for it, or running)
    t: dict = field(default_factory=dict)  # stage -> (start_ns, end_ns), for metrics and spans


def _is_device_broken(e: BaseException) -> bool:
    text = str(e)
    return not _is_oom(e) and ("CUDA error" in text or "device-side assert" in text or "CUBLAS_STATUS" in text)


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


class InlineExecutor(Executor):
    """Runs each task at once on the caller's thread (`stages = "inline"`): no pool, no hand-off."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - as a pool's future would hold it
            f.set_exception(e)
        return f


class Stages(Protocol):
    """What the engine asks of either pipeline, static (Pipeline, here) or continuous
    (consumer/continuous.py ContinuousPipeline); what only one of them does, the engine asks
    of it alone. Both put (Pending, [Out]) per finished request on the engine's `done` queue
    and set its wakeup when something ended."""

    fatal: BaseException | None  # a device that cannot go on: the engine raises FatalError

    @property
    def in_flight(self) -> int: ...

    def has_room(self, depth: int) -> bool: ...

    def submit(self, batch: list[Pending], depth: int = 0) -> None: ...

    def close(self) -> None: ...


class Pipeline:
    def __init__(self, runner, cpu: Executor, builder: ResultBuilder, done: SimpleQueue, row_type,
                 metrics: Metrics | None = None, inline: bool = False, wakeup: threading.Event | None = None,
                 costs: SimpleQueue | None = None):
        self.runner = runner
        self.cpu = cpu
        self.ready: SimpleQueue = SimpleQueue()  # (prepared job, when queued) for the device loop; None ends it
        self.builder = builder
        self.done = done  # receives list[(Pending, [Out])] per finished job
        self.Row = row_type
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._ahead = 0  # jobs not yet past the device: 0 means it can take the next batch at once
        # (rows, device seconds) per batch run: the engine's model of the device (adaptive batching)
        self.costs: SimpleQueue = costs if costs is not None else SimpleQueue()
        self.closed = False  # set by the engine on close: late failures are shutdown, not model errors
        self.fatal: BaseException | None = None  # a device that cannot go on (read by the loop)
        self.wakeup = wakeup or threading.Event()  # the engine's: set whenever a job finishes
        self._cpu_wait = self.metrics.queue_wait.labels("cpu")
        self._device_wait = self.metrics.queue_wait.labels("device")
        # inline: the device stage runs on the thread that prepared the job (the driver's, with an
        # InlineExecutor): for runners whose run() is short and holds the GIL anyway
        self.device = None if inline else threading.Thread(target=self._device_loop, name="inferlog-device",
                                                           daemon=True)
        if self.device is not None:
            self.device.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def has_room(self, depth: int) -> bool:
        """Another batch may go in: fewer than `depth` (pipeline_depth) are in flight."""
        return self._in_flight < depth

    @property
    def device_free(self) -> bool:
        """Nothing is being prepared for the device, queued for it or running on it."""
        return self._ahead == 0

    def _passed(self, job: Job) -> None:
        """The job is past the device (run, failed before or on it, or dropped at close)."""
        if job.ahead:
            job.ahead = False
            with self._lock:
                self._ahead -= 1
            self.wakeup.set()  # the loop may cut the next batch now

    def submit(self, batch: list[Pending], depth: int = 0) -> None:
        """A batch into the stages (from the loop thread; a failed batch's halves from the stage
        that failed): everything per request happens in prepare, on the pool."""
        job = Job(batch, new_batch_id(), depth=depth)
        with self._lock:
            self._in_flight += 1
            self._ahead += 1
        self._to_cpu(self._prepare_stage, job)

    def close(self) -> None:
        """Work still in flight is abandoned, not dead-lettered: the engine is going away and its
        uncommitted records are redone by whoever reads from the committed offsets. The device
        loop ends after the batch it runs, if any."""
        self.closed = True
        self.ready.put(None)

    # -- the stage loop and functions: each hands its job on, or fails it -------------------
    def _to_cpu(self, stage, job: Job) -> None:
        try:
            self.cpu.submit(stage, job, time.perf_counter())
        except RuntimeError as e:  # the pool is shut down: the worker is stopping
            self._failed(job, e)

    def _prepare_stage(self, job: Job, queued: float) -> None:
        self._cpu_wait.observe(time.perf_counter() - queued)
        try:
            self._prepare(job)
        except BaseException as e:  # noqa: BLE001 - a failing batch splits; nothing escapes a stage
            self._passed(job)
            self._failed(job, e)
            return
        if self.device is None:
            self._device_stage(job)
        else:
            self.ready.put((job, time.perf_counter()))

    def _device_loop(self) -> None:
        while (item := self.ready.get()) is not None:
            job, queued = item
            self._device_wait.observe(time.perf_counter() - queued)
            self._device_stage(job)

    def _device_stage(self, job: Job) -> None:
        if self.closed:
            self._passed(job)
            return
        try:
            self._run(job)
        except BaseException as e:  # noqa: BLE001
            self._passed(job)
            self._failed(job, e)
            return
        self.costs.put((len(job.rows), job.infer_ms / 1000))
        self._passed(job)
        self._to_cpu(self._finish_stage, job)

    def _finish_stage(self, job: Job, queued: float) -> None:
        self._cpu_wait.observe(time.perf_counter() - queued)
        try:
            done = self._finish(job)
        except BaseException as e:  # noqa: BLE001
            self._failed(job, e)
            return
        self._deliver(done)

    def _rows(self, batch: list[Pending]) -> list:
        """A row per input; a generation's default length is the runner's (Runner.new_tokens)."""
        return [self.Row(ids, p.request.parameters) for p in batch for ids in p.ids]

    # -- stages (each runs on its own executor) -----------------------------------------
    def _prepare(self, job: Job) -> Job:
        with self._stage(job, "prepare"):
            job.rows = rows = self._rows(job.batch)
            cost = self.runner.cost([len(r.ids) for r in rows], [r.params for r in rows])
            job.info = BatchInfo(job.batch_id, len(job.batch), cost)
            self.metrics.batch_size.observe(len(job.batch))
            self.metrics.batch_tokens.observe(cost)
            job.prepared = self.runner.prepare(rows)
        return job

    def _run(self, job: Job) -> Job:
        with self._stage(job, "infer"):
            job.raw = self.runner.run(job.prepared)
        start, end = job.t["infer"]
        job.infer_ms = (end - start) / 1e6
        return job

    def _finish(self, job: Job) -> list[tuple[Pending, list[Out]]]:
        with self._stage(job, "finish"):
            done = self._outputs(job)
        self._trace(job)
        return done

    @contextmanager
    def _stage(self, job: Job, name: str):
        start = time.time_ns()
        try:
            yield
        finally:
            end = time.time_ns()
            job.t[name] = (start, end)
            self.metrics.stage.labels(name).observe((end - start) / 1e9)

    def _trace(self, job: Job) -> None:
        """One span per batch, linked to each request's trace, with a child span per stage."""
        links = []
        for p in job.batch:
            carrier = {k: v.decode("latin-1") for k, v in p.trace_headers()}
            if carrier:
                ctx = trace.get_current_span(_propagator.extract(carrier)).get_span_context()
                if ctx.is_valid:
                    links.append(Link(ctx))
        start = job.t["prepare"][0]
        span = tracer.start_span("inferlog.batch", start_time=start, links=links, attributes={
            "inferlog.batch.id": job.info.batch_id, "inferlog.batch.size": job.info.size,
            "inferlog.batch.tokens": job.info.tokens, "inferlog.model": self.builder.model["name"],
            "inferlog.batch.split_depth": job.depth})
        parent = trace.set_span_in_context(span)
        for name in ("prepare", "infer", "finish"):
            s, e = job.t[name]
            tracer.start_span(f"inferlog.{name}", context=parent, start_time=s).end(end_time=e)
        span.end(end_time=job.t["finish"][1])

    def _outputs(self, job: Job) -> list[tuple[Pending, list[Out]]]:
        outputs = self.runner.finish(job.raw, job.prepared)
        if len(outputs) != len(job.rows):
            raise RuntimeError(f"runner returned {len(outputs)} outputs for {len(job.rows)} rows")
        done, i = [], 0
        for p in job.batch:
            n = len(p.ids)
            done.append((p, [self.builder.result(p, "OK", outputs[i : i + n], job.info, job.infer_ms)]))
            i += n
        job.prepared = job.raw = None  # free tensors before the outputs are emitted
        return done

    # -- the end of a job ---------------------------------------------------------------
    def _failed(self, job: Job, e: BaseException) -> None:
        """_fail, guarded: an error while failing a job (building its dead letters, say) still
        ends each of its records somewhere, or they would be stranded (no output, no commit past them)."""
        try:
            self._fail(job, e)
        except BaseException as e2:  # noqa: BLE001
            log.exception("failing batch %s failed too", job.batch_id)
            self._deliver([(p, [self.builder.dead_letter(p, ModelError(f"{type(e2).__name__}: {e2}"))])
                           for p in job.batch])

    def _deliver(self, done) -> None:
        self.done.put(done)
        with self._lock:
            self._in_flight -= 1
        self.wakeup.set()  # the loop may be waiting for a free slot

    def _fail(self, job: Job, e: BaseException) -> None:
        job.prepared = job.raw = None
        if self.closed:  # the engine is gone; its uncommitted records are redone by whoever comes next
            return
        if _is_device_broken(e):
            # a CUDA error other than out-of-memory poisons the context: every later batch would
            # fail too, and splitting would dead-letter innocent requests. Stop the worker; its
            # uncommitted records are redone by a healthy one.
            self.fatal = e
            return
        if _is_oom(e):
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # pragma: no cover - best effort
                pass
        if len(job.batch) > 1:
            log.warning("batch %s of %d failed (%s: %s); retrying as two halves",
                        job.batch_id, len(job.batch), type(e).__name__, e,
                        extra={"batch_id": job.batch_id, "batch_size": len(job.batch)})
            half = len(job.batch) // 2
            # submit the halves before releasing this job's slot, so in_flight never dips to 0
            self.submit(job.batch[:half], job.depth + 1)
            self.submit(job.batch[half:], job.depth + 1)
            with self._lock:
                self._in_flight -= 1
            return
        p = job.batch[0]
        err = e if isinstance(e, RecordError) else ModelError(f"{type(e).__name__}: {e}")
        log.warning("request %s failed alone in the model: %s", p.request.request_id, err.detail,
                    extra={"request_id": p.request.request_id, "batch_id": job.batch_id,
                           "reason": err.reason})
        self._deliver([(p, [self.builder.dead_letter(p, err)])])

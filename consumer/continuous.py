"""Generation by continuous batching: requests join the running batch as they come and leave
as they finish, on transformers' ContinuousBatchingManager (paged KV cache, its own scheduler
and generation thread).

The engine's contract is the static Pipeline's (submit, has_room, in_flight, done, fatal,
close, cancel, pump): the engine admits decoded requests while the running batch has room
(`max_batch_size` rows, `max_batch_tokens` of KV cache: prompt plus new tokens), each input
becomes one manager request, and a request's result goes to the engine's `done` queue the
moment its last input finished, out of order, into the same offset bookkeeping. Revoked
partitions' rows are cancelled in the manager (their results would be stale anyway: the
tracker's epochs drop them). A request that can never fit the cache is a dead letter
(INPUT_TOO_LARGE).

A model error in a step ends the manager's generation loop, and with it every row running.
So that one bad request never takes its batch-mates with it (as the static pipeline's split
promises), the failed requests are retried one at a time, each alone on a new manager once
the batch has drained; one that fails alone is a dead letter (MODEL_ERROR), and the batch
fills again. A broken CUDA context is fatal for the driver, as in the static pipeline.

Sampling: the manager samples every row from one generator, so a seeded request's text
depends on its batch-mates; `generation = "static"` keeps the deterministic per-row
generators. Greedy rows (no temperature) run at a temperature of 1e-6: argmax, except
between tokens whose logits are within ~1e-5 of each other (the manager's do_sample is one
switch for the whole batch).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from itertools import count
from queue import SimpleQueue

from inferlog.errors import InputTooLarge, ModelError

from .metrics import Metrics
from .pipeline import _is_device_broken
from .records import BatchInfo, Pending, new_batch_id
from .runners import sampling_temperature
from .results import ResultBuilder

log = logging.getLogger(__name__)

GREEDY = 1e-6  # the temperature a greedy row samples at (see the module doc)
PAGE = 32  # KV cache tokens per page


class _Request:
    """One Pending on its way through the manager: its inputs' outputs fill in as they finish."""

    __slots__ = ("p", "info", "outs", "left", "limits", "kv", "start", "solo")

    def __init__(self, p: Pending, info: BatchInfo, limits: list[int], kv: int, solo: bool = False):
        self.p, self.info, self.outs, self.left = p, info, [None] * len(limits), len(limits)
        self.limits, self.kv = limits, kv  # new tokens per input, and the cache they need with the prompts
        self.start = time.perf_counter()
        self.solo = solo  # a retry, running alone: a failure is its own


class ContinuousPipeline:
    def __init__(self, runner, builder: ResultBuilder, done: SimpleQueue, metrics: Metrics | None = None,
                 max_rows: int = 32, kv_tokens: int = 16384, wakeup: threading.Event | None = None):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.runner, self.builder, self.done = runner, builder, done
        self.metrics = metrics or Metrics()
        self.max_rows, self.kv_tokens = max_rows, kv_tokens
        self.wakeup = wakeup or threading.Event()  # the engine's
        self.fatal: BaseException | None = None
        self.closed = False
        self._lock = threading.Lock()
        self._kv = 0  # their KV cache budget (prompt + new tokens each)
        self._open: dict[str, tuple[_Request, int]] = {}  # manager request id -> (its request, input index)
        self._requests: dict[int, _Request] = {}  # id(Pending) -> request, while in flight
        self._ids = count()
        self.cancelled = 0  # rows cancelled in the manager (revocations, resets)
        self.restarts = 0  # managers started again after a model error
        self._retry: deque[Pending] = deque()  # failed in a batch: to run again, alone
        self._solo = False  # a retry runs alone now
        self._crashed: BaseException | None = None  # the manager's loop died of this
        eos = sorted(runner.eos_token_ids)
        self._gen = GenerationConfig(
            do_sample=True, temperature=0.5, top_p=1 - 1e-6,  # != the defaults: CB builds per-request processors
            max_new_tokens=runner.default_max_new_tokens, eos_token_id=eos or -1, pad_token_id=runner.pad_id)
        self._cfg = lambda: ContinuousBatchingConfig(
            page_size=PAGE, num_blocks=math.ceil(kv_tokens / PAGE) + max_rows,  # a partial page per row of slack
            max_batch_tokens=min(kv_tokens, 4096), max_requests_per_batch=max_rows, per_request_processors=True,
            allow_block_sharing=False)
        self.manager = self._new_manager()
        self._collector = threading.Thread(target=self._collect, name="inferlog-cb-results", daemon=True)
        self._collector.start()

    def _new_manager(self):
        m = self.runner.model.init_continuous_batching(generation_config=self._gen,
                                                        continuous_batching_config=self._cfg())
        m.start()
        return m

    # -- what the engine asks ------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._requests) + len(self._retry)

    @property
    def _rows(self) -> int:
        """Manager requests (one per input) admitted and not finished."""
        return len(self._open)

    def has_room(self, depth: int | None = None) -> bool:
        """The running batch can take another row (`depth`, the static pipeline's bound, does not
        apply). Not while retries wait: the batch drains so that each can run alone."""
        if self._retry or self._solo or self._crashed is not None:
            return False
        return self._rows < self.max_rows and self._kv < self.kv_tokens

    def fits(self, rows: int, kv: int) -> bool:
        """Admitting `rows` more rows that need `kv` cache tokens keeps the batch within its limits."""
        return self._rows + rows <= self.max_rows and self._kv + kv <= self.kv_tokens

    def kv_need(self, p: Pending) -> int:
        """Cache tokens the request needs: each prompt and the new tokens it may add (0 new tokens
        for a prompt with no room left: _admit dead-letters it)."""
        return sum(len(ids) + max(0, self.runner.limit(ids, p.request.parameters)) for ids in p.ids)

    # -- in ------------------------------------------------------------------------------------
    def submit(self, batch: list[Pending], depth: int = 0, solo: bool = False) -> None:
        """Admit the requests to the running batch (from the loop thread)."""
        info = BatchInfo(new_batch_id(), len(batch), sum(self.kv_need(p) for p in batch))
        for p in batch:
            try:
                self._admit(p, info, solo)
            except Exception as e:  # noqa: BLE001 - this request alone; the rest of the batch goes on
                err = e if isinstance(e, InputTooLarge) else ModelError(f"{type(e).__name__}: {e}")
                with self._lock:
                    self._solo = self._solo and not solo
                self.done.put([(p, [self.builder.dead_letter(p, err)])])
                self.wakeup.set()

    def pump(self) -> None:
        """Once per turn of the loop thread (Engine._dispatch): a manager whose loop died is
        replaced, its unanswered rows failed with it, and a retry starts alone when nothing
        else runs."""
        if self._crashed is not None:
            with self._lock:
                for rid, (req, _) in list(self._open.items()):  # rows it never answered
                    del self._open[rid]
                    self._release_locked(req, rows=1)
                    if req.left <= 0:
                        self._requests.pop(id(req.p), None)
                        self._retry_or_fail(req, f"the generation loop died: {self._crashed}")
            log.warning("continuous batching: the generation loop died (%s: %s); starting it again, and "
                        "retrying the %d requests it held one at a time", type(self._crashed).__name__,
                        self._crashed, len(self._retry))
            try:
                self.manager.stop(block=True, timeout=10, hard_stop=True)
            except Exception:  # noqa: BLE001 - it is dead already
                pass
            self.manager, self._crashed = self._new_manager(), None
            self.restarts += 1
        with self._lock:
            retry = self._retry.popleft() if self._retry and not self._solo and not self._open else None
            self._solo = self._solo or retry is not None
        if retry is not None:
            self.submit([retry], solo=True)

    def _retry_or_fail(self, req: _Request, why: str) -> None:
        """A request whose rows failed: again alone, or (alone already) a dead letter. Lock held."""
        if not req.solo:
            self._retry.append(req.p)
            return
        self._solo = False
        log.warning("request %s failed alone in the model: %s", req.p.request.request_id, why,
                    extra={"request_id": req.p.request.request_id})
        self.done.put([(req.p, [self.builder.dead_letter(req.p, ModelError(why))])])
        self.wakeup.set()

    def _admit(self, p: Pending, info: BatchInfo, solo: bool = False) -> None:
        prm = p.request.parameters
        limits = [self.runner.room(ids, prm) for ids in p.ids]  # InputTooLarge: no room for a new token
        kv = sum(len(ids) + n for ids, n in zip(p.ids, limits))
        if kv > self.kv_tokens:
            raise InputTooLarge(f"prompt and new tokens need {kv} KV cache tokens; the cache holds {self.kv_tokens} "
                                "(max_batch_tokens)")
        req = _Request(p, info, limits, kv, solo)
        t = sampling_temperature(prm)
        sampling = {"temperature": t or GREEDY, "top_p": float(prm.top_p or 1.0)}
        with self._lock:
            self._requests[id(p)] = req
            self._kv += kv
            rids = [f"r{next(self._ids)}" for _ in p.ids]
            for i, rid in enumerate(rids):
                self._open[rid] = (req, i)
        try:
            for rid, ids, n in zip(rids, p.ids, limits):
                # refused (None) when its loop has died: pump() then fails the row with it
                self.manager.add_request(list(ids), request_id=rid, max_new_tokens=n, **sampling)
        except BaseException:
            self.cancel(lambda q: q is p)  # nothing of it stays in the batch's accounting
            raise
        self.metrics.batch_tokens.observe(kv)

    def cancel(self, pred) -> int:
        """Cancel the running rows of the requests matching `pred` (revoked partitions, a reset)."""
        with self._lock:
            gone = [(rid, req) for rid, (req, _) in self._open.items() if pred(req.p)]
            for rid, req in gone:
                del self._open[rid]
                self._release_locked(req, rows=1)
            for req in {id(r): r for _, r in gone}.values():
                self._requests.pop(id(req.p), None)
                self._solo = self._solo and not req.solo
            self._retry = deque(p for p in self._retry if not pred(p))
        for rid, _ in gone:
            self.manager.cancel_request(rid)
        self.cancelled += len(gone)
        self.wakeup.set()
        return len(gone)

    def _release_locked(self, req: _Request, rows: int) -> None:
        """The request's rows left the batch (finished, failed or cancelled): its cache with the last."""
        req.left -= rows
        if req.left <= 0:
            self._kv -= req.kv

    # -- out: the collector thread -------------------------------------------------------------
    def _collect(self) -> None:
        while not self.closed:
            m = self.manager  # replaced by pump() after a crash
            out = m.get_result(timeout=0.1)
            if out is None:
                err = m.background_thread_status.fatal_error
                if err is not None and not self.closed and self._crashed is None and m is self.manager:
                    err = err if isinstance(err, BaseException) else RuntimeError(str(err))
                    if _is_device_broken(err):  # every later step would fail too: stop the driver
                        self.fatal = err
                        self.wakeup.set()
                        return
                    self._crashed = err  # the loop thread starts a new manager (pump)
                    self.wakeup.set()
                continue
            if out.is_finished():
                self._finished(out)

    def _finished(self, out) -> None:
        with self._lock:
            entry = self._open.pop(out.request_id, None)
            if entry is None:  # cancelled
                return
            req, i = entry
            self._release_locked(req, rows=1)
            req.outs[i] = out
            if req.left > 0:
                return
            self._requests.pop(id(req.p), None)
            failed = next((o.error for o in req.outs if o.error), None)
            if failed:
                self._retry_or_fail(req, str(failed))
                return
            self._solo = self._solo and not req.solo
        p = req.p
        infer_ms = (time.perf_counter() - req.start) * 1000
        texts = [self.runner.output(o.generated_tokens, n) for o, n in zip(req.outs, req.limits)]
        outs = [self.builder.result(p, "OK", texts, req.info, infer_ms)]
        self.metrics.stage.labels("infer").observe(infer_ms / 1000)
        self.done.put([(p, outs)])
        self.wakeup.set()

    def close(self) -> None:
        """Abandon what runs (its records stay uncommitted, redone by whoever comes next)."""
        self.closed = True
        try:
            self.manager.stop(block=True, timeout=10, hard_stop=True)
        except Exception:  # noqa: BLE001 - going away regardless
            log.debug("stopping the continuous batching manager", exc_info=True)

"""The decode stage (CPU pool): record bytes -> validated request -> token ids, or the typed
error that makes the record a dead letter."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future

from inferlog.codec import REQUEST, Codec
from inferlog.errors import DecodeError, InputTooLarge, InvalidRequest, RecordError, UnknownModel, UnsupportedTask
from inferlog.request import Limits, validate_request

from .records import Pending


class Decoder:
    """CPU stage: bytes -> validated request -> token ids. Never raises for a bad record."""

    def __init__(self, codec: Codec, runner, limits: Limits, max_input_tokens: int, model_names: set[str] | None):
        self.codec = codec
        self.runner = runner
        self.limits = limits
        self.max_tokens = min(max_input_tokens, runner.max_input_tokens)
        self.model_names = model_names

    def __call__(self, chunk: list[Pending]) -> list[Pending]:
        ok: list[Pending] = []
        for p in chunk:
            try:
                if p.value is None:
                    raise DecodeError("the record has no value (a tombstone)")
                rec = self.codec.decode(p.value, expect=REQUEST)
                p.ids_hint = (rec.get("request_id"), rec.get("tenant"))  # for a dead letter if invalid
                req = validate_request(rec, self.limits)
                if req.task != self.runner.task:
                    raise UnsupportedTask(f"task {req.task} is not served here; this worker serves {self.runner.task}")
                if req.model is not None and self.model_names is not None and req.model not in self.model_names:
                    raise UnknownModel(f"model {req.model!r} is not served here; this worker serves {self.runner.info.name!r}")
                p.request = req
                ok.append(p)
            except RecordError as e:
                p.error = e
        # one tokenizer call for the whole chunk: much cheaper than one per record
        texts = [t for p in ok for t in p.request.inputs]
        if texts:
            try:
                ids = self.runner.tokenize(texts)
            except Exception:  # one text broke the tokenizer: find it, record by record
                ids = None
            i = 0
            for p in ok:
                n = len(p.request.inputs)
                if ids is not None:
                    p.ids = ids[i : i + n]
                else:
                    try:
                        p.ids = self.runner.tokenize(p.request.inputs)
                    except Exception as e:
                        p.error = InvalidRequest(f"the tokenizer failed on this input: {type(e).__name__}: {e}")
                        continue
                i += n
                longest = max(len(x) for x in p.ids)
                if longest > self.max_tokens:
                    p.error = InputTooLarge(f"an input is {longest} tokens, more than the limit of {self.max_tokens}")
        return chunk


class DecodeStage:
    """Decoding as a stage like the others: each chunk of fetched records is one task on the CPU
    pool (inline: done at once), decoded into Pendings; the loop takes finished chunks in the
    order they were fetched. `wake` is called as each chunk ends (the engine's wakeup)."""

    def __init__(self, decoder: Decoder, cpu: Executor, metrics, wake: Callable):
        self.decoder, self.cpu, self.wake = decoder, cpu, wake
        self.chunks: deque[Future] = deque()
        self._wait = metrics.queue_wait.labels("cpu")
        self._took = metrics.stage.labels("decode")

    def submit(self, chunk: list, now: int, mono: float) -> None:
        """`chunk`: (confluent Message, epoch) pairs, consumed at `now` (ms) / `mono`."""
        fut = self.cpu.submit(self._decode, chunk, now, mono, time.perf_counter())
        fut.add_done_callback(self.wake)
        self.chunks.append(fut)

    def _decode(self, chunk: list, now: int, mono: float, submitted: float) -> list[Pending]:
        t0 = time.perf_counter()
        self._wait.observe(t0 - submitted)
        try:
            return self.decoder([Pending(m.topic(), m.partition(), m.offset(), epoch, m.key(), m.value(), m.headers(),
                                         now, mono) for m, epoch in chunk])
        finally:
            self._took.observe(time.perf_counter() - t0)

    def ready(self) -> Iterator[Pending]:
        """The decoded records of every finished chunk at the head, in fetch order."""
        while self.chunks and self.chunks[0].done():
            yield from self.chunks.popleft().result()

    @property
    def head_done(self) -> bool:
        return bool(self.chunks) and self.chunks[0].done()

    def __len__(self) -> int:
        return len(self.chunks)

"""What travels between the worker's stages, and the CPU-side stage functions.

A consumed record becomes a `Pending`; decode fills in the request and its token ids (or
the error that makes it a dead letter); a batch of them goes through the model; each ends
as `Out` messages (a result or a dead letter) handed to the offset tracker.
"""
from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec, avro_long
from inferlog.errors import DecodeError, InputTooLarge, InvalidRequest, OutputTooLarge, RecordError, UnknownModel, UnsupportedTask
from inferlog.request import Limits, Request, now_ms, validate_request

TRACE_HEADERS = ("traceparent", "tracestate")
# what a dead letter carries of the original at most: the producer refuses records over
# message.max.bytes (1,000,000 by default), and the dead letter adds its own fields
DEAD_LETTER_MAX_CARRIED = 900_000
MAX_OUTPUT_BYTES = 950_000  # a result larger than this could not be produced (message.max.bytes 1e6)
# The branch of InferenceResult.outputs' union each task's outputs take. Named in fastavro's
# tuple notation, the writer skips finding the branch by validating the output against each
# record of the union, which walked every float of an embedding: three 384-float outputs encode
# in ~110 µs instead of ~220 (bench/codec_bench.py); the bytes are the same.
OUTPUT_BRANCH = {"EMBED": "inferlog.Embedding", "GENERATE": "inferlog.Generation", "CLASSIFY": "inferlog.Classification"}


def union_branch(codec: Codec, name: str, field: str, branch: str) -> int:
    """The index of record `branch` in the union that the array `field` of `name` holds."""
    f = next(f for f in codec.store.latest(name)["fields"] if f["name"] == field)
    return [b["name"] if isinstance(b, dict) else b for b in f["type"]["items"]].index(branch)


# Below this many floats in a result the blocks gain nothing: fastavro's one pass over the whole
# record costs as much or less than its two around them (bench/codec_bench.py, the 1x1 rows).
SPLICE_MIN_FLOATS = 32


def encode_embeddings(outputs: list[dict], branch: bytes, min_floats: int = 0) -> bytes | None:
    """InferenceResult.outputs holding Embedding records, encoded as Avro writes them: the
    item count, each item's union branch and its vector as one block of little-endian float32
    (count, the floats, then the 0 that ends an array), and the 0 that ends the outputs.

    fastavro writes a vector float by float, ~130-250 ns each here: a 384-float embedding
    cost 50-90 µs of CPU per result, more than decoding, validating and batching its request
    (bench/codec_bench.py). A float32 array from the model is written here as it lies in
    memory. None, for fastavro to write them (or to say what is wrong with them), when an
    output is not a plain {"vector": 1-D floats}, or the outputs hold fewer than `min_floats`."""
    try:
        if sum(len(o["vector"]) for o in outputs) < min_floats:  # checked first: cheap for short lists
            return None
        vectors = [np.asarray(o["vector"], dtype="<f4") for o in outputs if len(o) == 1]
    except (KeyError, TypeError, ValueError):
        return None
    if len(vectors) != len(outputs) or any(v.ndim != 1 for v in vectors):
        return None
    parts = [avro_long(len(vectors))] if vectors else []
    for v in vectors:
        parts.append(branch)
        if v.size:
            parts += (avro_long(v.size), v.tobytes())
        parts.append(b"\x00")
    parts.append(b"\x00")
    return b"".join(parts)


class Out(NamedTuple):
    """One message to produce inside the commit."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    label: str = ""  # a result's status, or a dead letter's reason (for metrics)
    created_at: int | None = None  # the request's creation time, epoch ms (end-to-end latency)
    dead: bool = False
    tier: str = "normal"


@dataclass(slots=True)
class Pending:
    """One consumed record on its way to a result or a dead letter."""

    topic: str
    partition: int
    offset: int
    epoch: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    consumed_at: int  # epoch ms
    arrived: float = 0.0  # monotonic seconds, for the batching clock
    request: Request | None = None
    ids: list[list[int]] = field(default_factory=list)  # token ids per input
    error: RecordError | None = None
    ids_hint: tuple | None = None  # (request_id, tenant) of a record that decoded but did not validate

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)

    def trace_headers(self) -> list[tuple[str, bytes]]:
        return [(k, v) for k, v in (self.headers or ()) if k in TRACE_HEADERS and v is not None]


@dataclass(frozen=True, slots=True)
class BatchInfo:
    batch_id: str
    size: int
    tokens: int

    @staticmethod
    def new(size: int, tokens: int) -> "BatchInfo":
        return BatchInfo(new_batch_id(), size, tokens)


_BATCH_PREFIX = uuid.uuid4().hex[:8]  # per process: ids stay unique across workers
_batch_seq = itertools.count()


def new_batch_id() -> str:
    """16 hex characters, unique per process and across processes (a random prefix and a
    counter): cheaper than a uuid4 per batch, which reads the OS's random source."""
    return f"{_BATCH_PREFIX}{next(_batch_seq) & 0xFFFFFFFF:08x}"


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


class ResultBuilder:
    """Turns finished work into encoded result and dead-letter messages."""

    def __init__(self, codec: Codec, settings, model_info, replay_run_id: str | None = None):
        self.codec = codec
        self.high_priority = settings.high_priority
        self.results_topic = settings.results_topic
        self.deadletter_topic = settings.deadletter_topic
        self.worker_id = settings.worker_id
        self.model = {"name": model_info.name, "revision": model_info.revision, "digest": model_info.digest}
        self.replay_run_id = replay_run_id
        self.embedding_branch = avro_long(union_branch(codec, RESULT, "outputs", OUTPUT_BRANCH["EMBED"]))

    def result(self, p: Pending, status: str, outputs: list[dict], batch: BatchInfo | None,
               infer_ms: float = 0.0, error: str | None = None) -> Out:
        req = p.request
        # embeddings are written here as float32 blocks, the fields around them by fastavro
        vectors = (encode_embeddings(outputs, self.embedding_branch, SPLICE_MIN_FLOATS)
                   if req.task == "EMBED" else None)
        branch = OUTPUT_BRANCH.get(req.task)
        if vectors is not None:
            outputs = ()  # written already; fastavro skips the field (encode_spliced)
        elif branch:
            outputs = [(branch, o) for o in outputs]
        rec = {
            "request_id": req.request_id,
            "tenant": req.tenant,
            "task": req.task,
            "status": status,
            "outputs": outputs,
            "error": error,
            "model": self.model,
            "source": {"topic": p.topic, "partition": p.partition, "offset": p.offset},
            "timings": {"created_at": req.created_at, "consumed_at": p.consumed_at,
                        "completed_at": now_ms(), "infer_ms": float(infer_ms)},
            "batch": {"batch_id": batch.batch_id, "size": batch.size, "tokens": batch.tokens}
            if batch else {"batch_id": "", "size": 0, "tokens": 0},
            "worker_id": self.worker_id,
            "replay_run_id": self.replay_run_id,
        }
        key = req.request_id.encode()
        value = (self.codec.encode(RESULT, rec, trusted=True) if vectors is None
                 else self.codec.encode_spliced(RESULT, rec, "outputs", vectors))
        if len(value) + len(key) > MAX_OUTPUT_BYTES:
            # the producer would refuse it and the commit would be redone forever: answer with
            # a small dead letter instead (e.g. many inputs through a wide embedder)
            return self.dead_letter(p, OutputTooLarge(
                f"the result is {len(value)} bytes, over the {MAX_OUTPUT_BYTES}-byte limit of a record; "
                f"send fewer inputs per request"))
        return Out(self.results_topic, key, value, p.trace_headers(),
                   status, req.created_at, tier="high" if req.priority >= self.high_priority else "normal")

    def dead_letter(self, p: Pending, err: RecordError) -> Out:
        req = p.request
        rid, tenant = (req.request_id, req.tenant) if req else (p.ids_hint or (None, None))
        detail, value, headers = err.detail[:2000], p.value, {k: (v or b"") for k, v in (p.headers or ())}
        key = p.key
        # the key travels twice (record key and body), the value and headers once
        size = 2 * len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers.items())
        if size > DEAD_LETTER_MAX_CARRIED:
            # a record near the broker's size limit plus the dead letter's own fields would be too
            # large to produce: the commit would fail and be redone forever. Its source position
            # finds the original.
            detail += f" [the original key, value and headers ({size} bytes) are not carried; see the source offset]"
            value, headers = None, {}
            key = key if key is None or len(key) <= 1024 else None
        rec = {
            "source": {"topic": p.topic, "partition": p.partition, "offset": p.offset},
            "request_id": rid if isinstance(rid, str) else None,
            "tenant": tenant if isinstance(tenant, str) else None,
            "reason": err.reason,
            "detail": detail,
            "key": key,
            "value": value,
            "headers": headers,
            "worker_id": self.worker_id,
            "failed_at": now_ms(),
            "replay_run_id": self.replay_run_id,
        }
        return Out(self.deadletter_topic, key, self.codec.encode(DEADLETTER, rec, trusted=True), p.trace_headers(),
                   err.reason, req.created_at if req else None, dead=True)

    def expired(self, p: Pending) -> Out:
        return self.result(p, "EXPIRED", [], None, error=f"deadline {p.request.deadline} passed before the model ran")


def is_expired(p: Pending, now: int | None = None) -> bool:
    d = p.request.deadline
    return d is not None and (now if now is not None else now_ms()) > d


"""What travels between the worker's stages, and the CPU-side stage functions.

A consumed record becomes a `Pending`; decode fills in the request and its token ids (or
the error that makes it a dead letter); a batch of them goes through the model; each ends
as `Out` messages (a result or a dead letter) handed to the offset tracker.
"""
from __future__ import annotations

import itertools
import re
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec, avro_long
from inferlog.errors import DecodeError, InputTooLarge, InvalidRequest, OutputTooLarge, RecordError, UnknownModel, UnsupportedTask
from inferlog.request import Limits, Request, now_ms, validate_request

# What the worker copies from a request into its outputs' headers is only its W3C trace context,
# validated: a version-00 traceparent is exactly 55 characters, and a tracestate that propagators
# must keep is at most 512 (W3C Trace Context). Anything else is dropped, so no header a client
# sends can make an output too large to write.
_TRACEPARENT = re.compile(rb"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
TRACESTATE_MAX = 512
_TRACESTATE = re.compile(rb"[\x20-\x7e]*")  # printable ASCII, as its list-members are
# what a dead letter carries of the original at most: the producer refuses records over
# message.max.bytes (1,000,000 by default), and the dead letter adds its own fields
DEAD_LETTER_MAX_CARRIED = 900_000
# no output is larger than this, key, value and headers together (librdkafka counts all three
# against message.max.bytes, 1e6 by default); a larger one becomes a small dead letter
MAX_OUTPUT_BYTES = 950_000
MAX_CARRIED_ID = 256  # longest request_id/tenant a dead letter copies from a record that did not validate
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


def trace_context(headers) -> list[tuple[str, bytes]]:
    """The valid W3C trace context among a record's headers (the first of each name), or []:
    a tracestate without a valid traceparent means nothing, an invalid one is dropped."""
    parent = state = None
    for k, v in headers or ():
        if k == "traceparent" and parent is None:
            parent = v
        elif k == "tracestate" and state is None:
            state = v
    if not isinstance(parent, bytes) or not _TRACEPARENT.fullmatch(parent):
        return []
    if isinstance(state, bytes) and len(state) <= TRACESTATE_MAX and _TRACESTATE.fullmatch(state):
        return [("traceparent", parent), ("tracestate", state)]
    return [("traceparent", parent)]


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
    source: tuple[str, int, int] | None = None  # the request's position (for a fallback dead letter)

    @property
    def size(self) -> int:
        """What the producer counts against message.max.bytes: key, value and headers."""
        return len(self.key or b"") + len(self.value) + sum(len(k.encode()) + len(v or b"") for k, v in self.headers)


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

    @property
    def source(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)

    def trace_headers(self) -> list[tuple[str, bytes]]:
        return trace_context(self.headers)


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
        self.tier_of = settings.tier_of
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
        out = Out(self.results_topic, key, value, p.trace_headers(), status, req.created_at,
                  tier=self.tier(p), source=p.source)
        if out.size > MAX_OUTPUT_BYTES:
            # the producer would refuse it and the commit would be redone forever: answer with
            # a small dead letter instead (e.g. many inputs through a wide embedder)
            return self.dead_letter(p, OutputTooLarge(
                f"the result is {out.size} bytes, over the {MAX_OUTPUT_BYTES}-byte limit of a record; "
                f"send fewer inputs per request"))
        return out

    def tier(self, p: Pending) -> str:
        return self.tier_of(p.topic)  # a tier is its topic, whatever the record's priority says

    def dead_letter(self, p: Pending, err: RecordError) -> Out:
        """The dead letter of `p`, carrying its original key, value and headers when they fit."""
        req = p.request
        rid, tenant = (req.request_id, req.tenant) if req else (p.ids_hint or (None, None))
        # ids of a record that did not validate are whatever the client sent: copied only when short
        rid = rid if isinstance(rid, str) and len(rid) <= MAX_CARRIED_ID else None
        tenant = tenant if isinstance(tenant, str) and len(tenant) <= MAX_CARRIED_ID else None
        headers = {k: (v or b"") for k, v in (p.headers or ())}
        # the key travels twice (record key and body), the value and headers once
        size = 2 * len(p.key or b"") + len(p.value or b"") + sum(len(k.encode()) + len(v) for k, v in headers.items())
        if size <= DEAD_LETTER_MAX_CARRIED:
            out = self._dead_letter(p, err, rid, tenant, err.detail[:2000], p.key, p.value, headers)
            if out.size <= MAX_OUTPUT_BYTES:
                return out
            size = out.size
        # a record near the broker's size limit plus the dead letter's own fields would be too
        # large to produce: the commit would fail and be redone forever. Its source position
        # finds the original.
        detail = (err.detail[:2000] + f" [the original key, value and headers ({size} bytes) are not carried; "
                  "see the source offset]")
        key = p.key if p.key is None or len(p.key) <= 1024 else None
        return self._dead_letter(p, err, rid, tenant, detail, key, None, {})

    def _dead_letter(self, p: Pending, err: RecordError, rid, tenant, detail, key, value, headers) -> Out:
        rec = {
            "source": {"topic": p.topic, "partition": p.partition, "offset": p.offset},
            "request_id": rid,
            "tenant": tenant,
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
                   err.reason, p.request.created_at if p.request else None, dead=True, tier=self.tier(p),
                   source=p.source)

    def unwritable(self, out: Out, why: str) -> Out:
        """A small dead letter for an output the producer refused, from its source position
        alone: the partition moves on and the position finds the original request."""
        topic, partition, offset = out.source
        rec = {"source": {"topic": topic, "partition": partition, "offset": offset}, "request_id": None,
               "tenant": None, "reason": "OUTPUT_UNWRITABLE", "detail": why[:2000], "key": None, "value": None,
               "headers": {}, "worker_id": self.worker_id, "failed_at": now_ms(), "replay_run_id": self.replay_run_id}
        return Out(self.deadletter_topic, None, self.codec.encode(DEADLETTER, rec, trusted=True), [],
                   "OUTPUT_UNWRITABLE", out.created_at, dead=True, tier=out.tier, source=out.source)

    def expired(self, p: Pending) -> Out:
        return self.result(p, "EXPIRED", [], None, error=f"deadline {p.request.deadline} passed before the model ran")


def is_expired(p: Pending, now: int | None = None) -> bool:
    d = p.request.deadline
    return d is not None and (now if now is not None else now_ms()) > d


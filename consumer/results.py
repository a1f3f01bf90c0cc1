"""The finish stage's messages: a request's result or dead letter, encoded, within the size
of one Kafka record."""
from __future__ import annotations

from inferlog.codec import DEADLETTER, RESULT, SPLICE_MIN_FLOATS, Codec, avro_long, encode_embeddings, union_branch
from inferlog.errors import OutputTooLarge, RecordError
from inferlog.request import now_ms

from .records import BatchInfo, Out, Pending

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


class ResultBuilder:
    """Turns finished work into encoded result and dead-letter messages."""

    def __init__(self, codec: Codec, settings, model_info, replay_run_id: str | None = None):
        self.codec = codec
        self.tier_of = settings.tier_of
        # the model's own outputs; a replay's, as its settings name them (replay/runner.py run_settings)
        self.results_topic, self.deadletter_topic = ((settings.results_topic, settings.deadletter_topic)
                                                     if replay_run_id else settings.model_outputs())
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

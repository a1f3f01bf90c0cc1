"""Kafka -> Arrow: the records of a time window of the requests, results and dead-letter
topics as flat tables (the shape `audit sql` queries and `audit export` writes).

The requests table holds both tiers' request topics. Every table has a `tier` column (high
or normal: the tier of the request, which is its topic) and ends with the record's Kafka
position (topic, partition, offset, kafka_ts, key).
A window's edges are exact per record: offsets_for_times only cuts the offsets coarsely, so
records whose own timestamp falls outside [since, until) (producers may stamp out of order)
are dropped here.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import pyarrow as pa

from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec
from inferlog.errors import DecodeError

from .window import Window, WindowReader, resolve_window

TS = pa.timestamp("ms", tz="UTC")
STR, I32, I64, F32 = pa.string(), pa.int32(), pa.int64(), pa.float32()
PROGRESS_MIN = 20_000  # records in a window above which loading shows a progress bar

TIER = ("tier", STR)
POSITION = (("topic", STR), ("partition", I32), ("offset", I64), ("kafka_ts", TS), ("key", STR))


def _request(r: dict) -> tuple:
    p = r["parameters"]
    return (r["request_id"], r["tenant"], r["task"], r["model"], len(r["inputs"]), r["inputs"],
            p["max_new_tokens"], p["temperature"], p["top_p"], p["seed"], r["created_at"], r["priority"],
            r["deadline"], list(r["metadata"].items()))


def _result(r: dict) -> tuple:
    outs, t, b, m, s = r["outputs"], r["timings"], r["batch"], r["model"], r["source"]
    # the output union decodes to plain dicts: tell the kinds apart by their fields
    texts = [o["text"] for o in outs if "text" in o] or None
    labels = [o["label"] for o in outs if "label" in o] or None
    scores = [o["score"] for o in outs if "label" in o] or None
    vectors = [o["vector"] for o in outs if "vector" in o] or None
    return (r["request_id"], r["tenant"], r["task"], r["status"], r["error"], m["name"], m["revision"],
            m["digest"], s["topic"], s["partition"], s["offset"], t["created_at"], t["consumed_at"],
            t["completed_at"], t["completed_at"] - t["created_at"], t["infer_ms"], b["batch_id"], b["size"],
            b["tokens"], r["worker_id"], r["replay_run_id"], len(outs), texts, labels, scores,
            len(vectors[0]) if vectors else None, vectors)


def _dead_letter(r: dict) -> tuple:
    s = r["source"]
    return (r["request_id"], r["tenant"], r["reason"], r["detail"], s["topic"], s["partition"], s["offset"],
            r["failed_at"], r["worker_id"], r["replay_run_id"], r["value"])


@dataclass(frozen=True)
class TableSpec:
    name: str  # the SQL table (and Parquet file) name
    record: str  # the Avro record its topic carries
    fields: tuple[tuple[str, pa.DataType], ...]
    row: Callable[[dict], tuple]  # decoded record -> values of `fields`, in order
    request_topic: Callable[[dict, object], str]  # (decoded record, message) -> the request's topic: its tier

    def schema(self, drop: Iterable[str] = ()) -> pa.Schema:
        return pa.schema([f for f in (*self.fields, TIER, *POSITION) if f[0] not in drop])


def _own_topic(rec: dict, msg) -> str:
    return msg.topic()


def _source_topic(rec: dict, msg) -> str:
    return rec["source"]["topic"]


REQUESTS = TableSpec("requests", REQUEST, (
    ("request_id", STR), ("tenant", STR), ("task", STR), ("model", STR), ("n_inputs", I32),
    ("inputs", pa.list_(STR)), ("max_new_tokens", I32), ("temperature", F32), ("top_p", F32), ("seed", I64),
    ("created_at", TS), ("priority", I32), ("deadline", TS), ("metadata", pa.map_(STR, STR)),
), _request, _own_topic)

RESULTS = TableSpec("results", RESULT, (
    ("request_id", STR), ("tenant", STR), ("task", STR), ("status", STR), ("error", STR),
    ("model_name", STR), ("model_revision", STR), ("model_digest", STR),
    ("source_topic", STR), ("source_partition", I32), ("source_offset", I64),
    ("created_at", TS), ("consumed_at", TS), ("completed_at", TS), ("latency_ms", I64), ("infer_ms", F32),
    ("batch_id", STR), ("batch_size", I32), ("batch_tokens", I32), ("worker_id", STR), ("replay_run_id", STR),
    ("n_outputs", I32), ("texts", pa.list_(STR)), ("labels", pa.list_(STR)), ("scores", pa.list_(F32)),
    ("embedding_dim", I32), ("embeddings", pa.list_(pa.list_(F32))),
), _result, _source_topic)

DEAD_LETTERS = TableSpec("dead_letters", DEADLETTER, (
    ("request_id", STR), ("tenant", STR), ("reason", STR), ("detail", STR),
    ("source_topic", STR), ("source_partition", I32), ("source_offset", I64), ("failed_at", TS),
    ("worker_id", STR), ("replay_run_id", STR), ("value", pa.binary()),
), _dead_letter, _source_topic)

SPECS = (REQUESTS, RESULTS, DEAD_LETTERS)
VECTORS = ("embeddings",)  # heavy (dim floats per output): only loaded when asked for


def records(settings, w: Window, progress: bool = False):
    """The records of a window, as window.read_window reads them (each poll returns on the
    first record or end-of-partition event: clients.consume_ready)."""
    reader = WindowReader(settings, w, progress=progress)
    try:
        while not reader.done():
            yield from reader.poll()
    finally:
        reader.close()


def identify(rec: dict, codec: Codec) -> dict:
    """A dead letter of a request that decoded but failed validation carries no request_id or
    tenant (the worker sets them only for valid requests); its original value still holds them."""
    if rec.get("request_id", "") is not None or not rec.get("value"):
        return rec
    try:
        req = codec.decode(rec["value"], expect=REQUEST)
    except DecodeError:
        return rec
    return {**rec, "request_id": req["request_id"], "tenant": req["tenant"]}


def in_window(ts: int, since_ms: int | None, until_ms: int | None) -> bool:
    return (since_ms is None or ts >= since_ms) and (until_ms is None or ts < until_ms)


def show_progress(w: Window, progress: bool | None) -> bool:
    """A bar for this window: None, only for a big one; True, for any that is not empty."""
    return w.total >= PROGRESS_MIN if progress is None else progress and w.total > 0


def decoded(settings, w: Window, expect: str, codec: Codec, since_ms: int | None, until_ms: int | None,
            progress: bool | None = None) -> Iterator[dict]:
    """The records of the window stamped in [since, until) that decode as `expect`, identified;
    the others are skipped."""
    for m in records(settings, w, show_progress(w, progress)):
        if not in_window(m.timestamp()[1], since_ms, until_ms):
            continue
        try:
            yield identify(codec.decode(m.value() or b"", expect=expect), codec)
        except DecodeError:
            continue


class TableBuilder:
    """Decoded rows of one spec, turned into Arrow batches every CHUNK rows so that a big
    window is held as columns, not Python objects. Records that do not decode as the spec
    are counted and skipped (on the requests topic they are the dead letters' business).
    `tier_of` (Settings.tier_of) names a request topic's tier; without it `tier` is NULL."""

    CHUNK = 50_000

    def __init__(self, spec: TableSpec, codec: Codec | None, drop: tuple[str, ...] = (),
                 tier_of: Callable[[str], str] | None = None):
        self.spec, self.codec, self.tier_of = spec, codec, tier_of
        self.schema = spec.schema(drop)
        self._keep = [i for i, f in enumerate(spec.schema()) if f.name not in drop]
        self._rows: list[tuple] = []
        self._batches: list[pa.RecordBatch] = []
        self.rows = 0  # rows kept
        self.read = 0  # records fetched from Kafka
        self.undecodable = 0
        self.by_topic: Counter = Counter()  # rows kept, per topic read

    def add(self, msg, since_ms: int | None = None, until_ms: int | None = None) -> None:
        self.read += 1
        ts = msg.timestamp()[1]
        if not in_window(ts, since_ms, until_ms):
            return
        try:
            rec = self.codec.decode(msg.value() or b"", expect=self.spec.record)
        except DecodeError:
            self.undecodable += 1
            return
        key = msg.key()
        rec = identify(rec, self.codec)
        tier = self.tier_of(self.spec.request_topic(rec, msg)) if self.tier_of else None
        row = (*self.spec.row(rec), tier, msg.topic(), msg.partition(), msg.offset(), ts,
               key.decode("utf-8", "replace") if key is not None else None)
        self._rows.append(tuple(row[i] for i in self._keep))  # dropped columns (vectors) are not held
        self.rows += 1
        self.by_topic[msg.topic()] += 1
        if len(self._rows) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        cols = list(zip(*self._rows)) if self._rows else [()] * len(self.schema)
        self._batches.append(pa.record_batch([pa.array(c, type=f.type) for c, f in zip(cols, self.schema)],
                                             schema=self.schema))
        self._rows = []

    def table(self) -> pa.Table:
        if self._rows or not self._batches:
            self._flush()
        return pa.Table.from_batches(self._batches, schema=self.schema)


def load_tables(settings, sources: list[tuple[TableSpec, list[str]]], since_ms: int | None,
                until_ms: int | None, *, codec: Codec, drop: tuple[str, ...] = (),
                progress: bool | None = None) -> dict[str, TableBuilder]:
    """Read the window of every (spec, topics) source into one builder per spec. Every window
    is resolved before any is read, so an unknown topic fails before a long read.
    progress None: a bar (stderr) only for big windows."""
    windows = [(spec, resolve_window(settings, t, since=since_ms, until=until_ms))
               for spec, topics in sources for t in topics]
    builders = {spec.name: TableBuilder(spec, codec, drop, settings.tier_of) for spec, _ in sources}
    for spec, w in windows:
        b = builders[spec.name]
        for msg in records(settings, w, show_progress(w, progress)):
            b.add(msg, since_ms, until_ms)
    return builders

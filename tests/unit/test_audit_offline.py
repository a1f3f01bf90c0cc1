"""Audit's parts that need no broker: Kafka's murmur2 partitioner, the Arrow table builder's
exact windows, table formatting and durations. tests/broker/test_audit.py runs audit against a
real broker and the real default model."""
from __future__ import annotations

import click
import pytest

from inferlog.codec import DEADLETTER, REQUEST, Codec
from inferlog.replay.audit import format_table, parse_duration, partition_for
from inferlog.replay.tables import DEAD_LETTERS, REQUESTS, TableBuilder
from inferlog.request import build_request


def test_partition_for_is_javas_murmur2_partitioner():
    # Kafka's UtilsTest.testMurmur2 vectors (signed 32-bit), then toPositive(h) % n
    for key, h in [("21", -973932308), ("foobar", -790332482), ("abc", 479470107),
                   ("a-little-bit-longer-string", -1486304829)]:
        assert partition_for(key.encode(), 6) == (h & 0x7FFFFFFF) % 6
        assert partition_for(key.encode(), 1) == 0


class FakeMessage:
    def __init__(self, value, ts, offset, key=b"k"):
        self._v, self._ts, self._o, self._k = value, ts, offset, key

    def value(self): return self._v
    def key(self): return self._k
    def timestamp(self): return (1, self._ts)
    def topic(self): return "t"
    def partition(self): return 2
    def offset(self): return self._o


def test_table_builder_keeps_the_exact_window_in_arrow_batches(monkeypatch):
    codec = Codec()
    monkeypatch.setattr(TableBuilder, "CHUNK", 2)
    tier_of = {"t": "high"}.get  # FakeMessage's topic is the high tier's
    b = TableBuilder(REQUESTS, codec, tier_of=tier_of)
    reqs = [build_request("embed", [f"text {i}", "second"], tenant=f"t{i}") for i in range(5)]
    stamps = [99, 100, 150, 199, 200]  # window [100, 200)
    for i, (r, ts) in enumerate(zip(reqs, stamps)):
        b.add(FakeMessage(codec.encode(REQUEST, r), ts, i), 100, 200)
    b.add(FakeMessage(b"not avro", 150, 9), 100, 200)
    t = b.table()
    assert (b.read, b.rows, b.undecodable) == (6, 3, 1)
    assert t.column("tenant").to_pylist() == ["t1", "t2", "t3"] and t.column("tier").to_pylist() == ["high"] * 3
    assert t.column("n_inputs").to_pylist() == [2, 2, 2] and t.column("offset").to_pylist() == [1, 2, 3]
    assert str(t.schema.field("kafka_ts").type) == "timestamp[ms, tz=UTC]"
    # an invalid request's dead letter has no request_id; the table reads it from the value
    dead = {"source": {"topic": "other", "partition": 2, "offset": 7}, "reason": "INVALID_REQUEST", "detail": "d",
            "worker_id": "w", "failed_at": 150, "value": codec.encode(REQUEST, reqs[0])}
    d = TableBuilder(DEAD_LETTERS, codec, tier_of=tier_of)
    d.add(FakeMessage(codec.encode(DEADLETTER, dead), 150, 0))
    assert d.table().column("request_id").to_pylist() == [reqs[0]["request_id"]]
    assert d.table().column("tier").to_pylist() == [None], "a dead letter's tier is its source's"


def test_format_table_and_durations():
    import pyarrow as pa

    text = format_table(pa.table({"a": [1, None], "a2": ["x" * 60, "y"]}).rename_columns(["a", "a"]))
    lines = text.splitlines()
    assert lines[0].split() == ["a", "a"] and "NULL" in lines[3] and lines[-1] == "(2 rows)"
    assert len(lines[2]) < 60  # long cells are cut
    assert [parse_duration(d) for d in ("0", "90s", "10m", "1h", "1.5d")] == [0, 90_000, 600_000, 3_600_000,
                                                                              129_600_000]
    with pytest.raises(click.ClickException):
        parse_duration("soon")

"""Unit tests of the Avro codec: no broker; the Confluent registry is confluent-kafka's mock."""
from __future__ import annotations

import io
import json
import random
import struct
import tracemalloc
from datetime import datetime, timezone

import fastavro
import pytest
from fastavro.schema import expand_schema
from hypothesis import HealthCheck, given, settings, strategies as st

from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec, SchemaStore, avro_long
from inferlog.errors import (
    ConfigError,
    DecodeError,
    FatalError,
    InvalidRequest,
    SchemaTypeError,
    TruncatedRecord,
    UnknownFraming,
    UnknownSchema,
    WrongSchema,
)

pytest.importorskip("cachetools")  # confluent_kafka.schema_registry needs it
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, record_subject_name_strategy  # noqa: E402
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer  # noqa: E402
from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: E402

CTX = SerializationContext("inferlog.requests", MessageField.VALUE)
T0 = 1_700_000_000_123  # epoch ms


# -- records -------------------------------------------------------------------------------
def request(**kw) -> dict:
    rec = {
        "request_id": "r-1", "tenant": "acme", "task": "GENERATE", "model": "gpt2",
        "inputs": ["hello", "wörld", "日本語"],
        "parameters": {"max_new_tokens": 8, "temperature": 0.5, "top_p": 0.25, "seed": 2**63 - 1},
        "created_at": T0, "priority": -3, "deadline": T0 + 5000, "metadata": {"trace": "abc"},
    }
    return {**rec, **kw}


def result(outputs: list, **kw) -> dict:
    rec = {
        "request_id": "r-1", "tenant": "acme", "task": "EMBED", "status": "OK", "outputs": outputs,
        "error": None, "model": {"name": "minilm", "revision": "main", "digest": "0123456789abcdef"},
        "source": {"topic": "inferlog.requests", "partition": 3, "offset": 2**40},
        "timings": {"created_at": T0, "consumed_at": T0 + 1, "completed_at": T0 + 2, "infer_ms": 1.5},
        "batch": {"batch_id": "b-7", "size": 4, "tokens": 128}, "worker_id": "w-1", "replay_run_id": None,
    }
    return {**rec, **kw}


EMBEDDING = {"vector": [0.5, -1.25, 3.0]}
GENERATION = {"text": "once upon", "tokens": 2, "finish_reason": "length"}
CLASSIFICATION = {"label": "pos", "score": 0.75, "scores": {"pos": 0.75, "neg": 0.25}}
DEAD = {
    "source": {"topic": "inferlog.requests", "partition": 0, "offset": 17}, "request_id": None, "tenant": None,
    "reason": "UNDECODABLE", "detail": "first byte 7F", "key": b"k\x00\xff", "value": b"\x7f\x80",
    "headers": {"h": b"\x01\x02"}, "worker_id": "w-1", "failed_at": T0, "replay_run_id": "run-9",
}
RECORDS = {
    "request": (REQUEST, request()),
    "request-minimal": (REQUEST, request(model=None, deadline=None, metadata={},
                                         parameters=dict.fromkeys(["max_new_tokens", "temperature", "top_p", "seed"]))),
    "result-embedding": (RESULT, result([EMBEDDING, EMBEDDING])),
    "result-generation": (RESULT, result([GENERATION], task="GENERATE")),
    "result-classification": (RESULT, result([CLASSIFICATION], task="CLASSIFY")),
    "result-mixed": (RESULT, result([EMBEDDING, GENERATION, CLASSIFICATION])),
    "result-error": (RESULT, result([], status="ERROR", error="boom")),
    "deadletter": (DEADLETTER, DEAD),
}


@pytest.fixture
def registry():
    return SchemaRegistryClient.new_client({"url": "mock://codec-tests"})


@pytest.fixture(params=["single-object", "confluent"])
def codec(request, registry):
    return Codec(framing=request.param, registry_client=registry)


# -- the store -------------------------------------------------------------------------------
def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO as the Avro specification writes it, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for b in data:
        fp = (fp >> 8) ^ table[(fp ^ b) & 0xFF]
    return fp


def test_crc_reference_matches_the_spec_vector():
    # schema-tests.txt in the Avro repository: "int" -> 8247732601305521295
    assert crc64_avro(b'"int"') == 8247732601305521295


def test_store_fingerprints_are_crc64_of_canonical_form_little_endian():
    store = SchemaStore()
    assert store.versions(REQUEST) == [1, 2]
    for name in (REQUEST, RESULT, DEADLETTER):
        for v in store.versions(name):
            pcf = fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(store.raw(name, v), named_schemas={}))
            fp = store.fingerprint(name, v)
            assert fp == crc64_avro(pcf.encode()).to_bytes(8, "little")
            assert store.by_fingerprint(fp)[:2] == (name, v)
    assert store.fingerprint(REQUEST) == store.fingerprint(REQUEST, 2) != store.fingerprint(REQUEST, 1)
    assert [f["name"] for f in store.latest(REQUEST)["fields"]][-3:] == ["priority", "deadline", "metadata"]
    with pytest.raises(UnknownSchema, match="00000000"):
        store.by_fingerprint(bytes(8))
    with pytest.raises(UnknownSchema, match="no schema named"):
        store.latest("inferlog.Nope")


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", RECORDS)
def test_round_trip(codec, kind):
    name, rec = RECORDS[kind]
    data = codec.encode(name, rec)
    assert codec.decode(data) == rec
    assert codec.decode(data, expect=name) == rec
    assert codec.decode_named(data) == (name, rec)
    # a fresh codec (cold caches) sharing the registry reads it too
    assert Codec(registry_client=codec._registry).decode(data) == rec


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# random floats are full of high-bit byte runs: decode takes the exact varint walk for these
WIDE = (RESULT, result([{"vector": [f32(random.Random(i).uniform(-1, 1)) for i in range(384)]}] * 2))


def test_wide_embedding_round_trip(codec):
    assert codec.decode(codec.encode(*WIDE)) == WIDE[1]


def test_every_truncation_of_every_record_is_detected(codec):
    for name, rec in [*RECORDS.values(), WIDE]:
        data = codec.encode(name, rec)
        for cut in range(1, len(data)):
            with pytest.raises(TruncatedRecord):
                codec.decode(data[:cut])


def test_single_object_layout():
    data = Codec().encode(REQUEST, request())
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == SchemaStore.default().fingerprint(REQUEST)


def test_timestamps_are_int_milliseconds_both_ways(codec):
    out = codec.decode(codec.encode(REQUEST, request()))
    assert type(out["created_at"]) is int and out["created_at"] == T0
    assert type(out["deadline"]) is int and out["deadline"] == T0 + 5000


def test_confluent_layout_and_registered_schema_keeps_logical_types(registry):
    data = Codec(framing="confluent", registry_client=registry).encode(REQUEST, request())
    assert data[0] == 0
    sid = int.from_bytes(data[1:5], "big")
    registered = registry.get_latest_version(REQUEST)  # RecordNameStrategy: subject = full name
    assert registered.schema_id == sid
    assert '"timestamp-millis"' in registered.schema.schema_str


def test_registry_id_is_cached(registry):
    calls = []
    real = registry.register_schema
    registry.register_schema = lambda *a, **k: calls.append(a) or real(*a, **k)
    c = Codec(framing="confluent", registry_client=registry)
    c.encode(REQUEST, request())
    c.encode(REQUEST, request(request_id="r-2"))
    assert len(calls) == 1


# -- schema evolution -------------------------------------------------------------------------
V1_FIELDS = ["request_id", "tenant", "task", "model", "inputs", "parameters", "created_at"]


def v1_record() -> dict:
    return {k: request()[k] for k in V1_FIELDS}


def test_v1_single_object_decodes_with_v2_defaults():
    store = SchemaStore.default()
    fo = io.BytesIO()
    fo.write(b"\xc3\x01" + store.fingerprint(REQUEST, 1))
    fastavro.schemaless_writer(fo, fastavro.parse_schema(store.raw(REQUEST, 1), named_schemas={}), v1_record())
    out = Codec().decode(fo.getvalue(), expect=REQUEST)
    assert out == {**v1_record(), "priority": 0, "deadline": None, "metadata": {}}


def test_v1_from_confluent_serializer_decodes_with_v2_defaults(registry):
    ser = AvroSerializer(registry, json.dumps(SchemaStore.default().raw(REQUEST, 1)),
                         conf={"subject.name.strategy": record_subject_name_strategy})
    out = Codec(registry_client=registry).decode(ser(v1_record(), CTX))
    assert out == {**v1_record(), "priority": 0, "deadline": None, "metadata": {}}


# -- interoperability with confluent-kafka's own serdes ----------------------------------------
@pytest.mark.parametrize("kind", ["request", "result-mixed", "deadletter"])
def test_confluent_serializer_bytes_decode_with_codec(registry, kind):
    name, rec = RECORDS[kind]
    ser = AvroSerializer(registry, json.dumps(SchemaStore.default().raw(name)),
                         conf={"subject.name.strategy": record_subject_name_strategy})
    data = ser(rec, CTX)
    assert data[0] == 0
    assert Codec(registry_client=registry).decode(data, expect=name) == rec


def test_codec_bytes_decode_with_confluent_deserializer(registry):
    data = Codec(framing="confluent", registry_client=registry).encode(REQUEST, request())
    out = AvroDeserializer(registry)(data, CTX)
    # confluent's deserializer keeps logical types: timestamps come back as datetimes
    assert out["created_at"] == datetime.fromtimestamp(T0 / 1000, timezone.utc)
    assert {k: v for k, v in out.items() if k not in ("created_at", "deadline")} == {
        k: v for k, v in request().items() if k not in ("created_at", "deadline")}


# -- bad bytes ------------------------------------------------------------------------------
def zz(n: int) -> bytes:
    """Avro zig-zag varint."""
    u = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b, u = u & 0x7F, u >> 7
        out.append(b | (0x80 if u else 0))
        if not u:
            return bytes(out)


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return zz(len(raw)) + raw


def req_body(**pieces) -> bytes:
    """A v2 request body built field by field, so each test corrupts exactly one field."""
    fields = {
        "request_id": s("r-1"), "tenant": s("acme"), "task": zz(1), "model": zz(0),
        "inputs": zz(1) + s("hi") + zz(0), "parameters": zz(0) * 4, "created_at": zz(T0),
        "priority": zz(0), "deadline": zz(0), "metadata": zz(0),
    }
    fields.update(pieces)
    return b"".join(fields.values())


SO = b"\xc3\x01" + SchemaStore.default().fingerprint(REQUEST)
OVERLONG = b"\xff" * 10 + b"\x01"  # 11-byte varint: past 64 bits


def test_hand_built_body_is_valid():
    out = Codec().decode(SO + req_body())
    assert out["inputs"] == ["hi"] and out["task"] == "GENERATE" and out["created_at"] == T0


@pytest.mark.parametrize("data, error, message", [
    (b"", UnknownFraming, "empty"),
    (b"\x7f" + req_body(), UnknownFraming, "7F"),
    (b"\xc3\x02" + bytes(8) + req_body(), UnknownFraming, "C3 followed by 02"),
    (b"\xc3", TruncatedRecord, "header"),
    (SO[:9], TruncatedRecord, "header needs 10"),
    (b"\x00\x00\x01", TruncatedRecord, "header needs 5"),
    (b"\xc3\x01" + bytes(8) + req_body(), UnknownSchema, "fingerprint 0000000000000000"),
    (b"\x00\x00\x00\x00\x63" + req_body(), UnknownSchema, "99"),
    (SO + req_body()[:-3], TruncatedRecord, "InferenceRequest"),
    (SO + req_body(request_id=zz(100) + b"abc"), TruncatedRecord, "100 bytes"),
    (SO + req_body(request_id=zz(2**62) + b"abc"), TruncatedRecord, str(2**62)),
    (SO + req_body(inputs=zz(2**62) + s("x")), TruncatedRecord, "array declares"),
    (SO + req_body(request_id=zz(-1) + b"abc"), SchemaTypeError, "negative length"),
    (SO + req_body(model=zz(2)), SchemaTypeError, "union index 2"),
    (SO + req_body(model=zz(-1)), SchemaTypeError, "union index -1"),
    (SO + req_body(task=zz(3)), SchemaTypeError, "enum inferlog.Task index 3"),
    (SO + req_body(request_id=s(b"\xff\xfe")), SchemaTypeError, "UnicodeDecodeError"),
    (SO + req_body(created_at=OVERLONG), SchemaTypeError, "overflows 64 bits"),
    (SO + req_body(request_id=b"\x80" * 12 + b"\x00"), SchemaTypeError, "overflows 64 bits"),
    (SO + req_body() + b"\x00", SchemaTypeError, "1 trailing bytes"),
])
def test_bad_bytes_raise_typed_errors(registry, data, error, message):
    with pytest.raises(error, match=message) as info:
        Codec(registry_client=registry).decode(data)
    assert type(info.value) is error  # not merely a subclass: the reason code must be exact


def test_confluent_record_without_registry_is_unknown_schema():
    with pytest.raises(UnknownSchema, match="no schema registry"):
        Codec().decode(b"\x00\x00\x00\x00\x01" + req_body())


def test_registry_schema_with_no_local_name_is_unknown(registry):
    other = {"type": "record", "name": "Other", "namespace": "elsewhere", "fields": [{"name": "x", "type": "int"}]}
    sid = registry.register_schema("elsewhere.Other", Schema(json.dumps(other), "AVRO"))
    with pytest.raises(UnknownSchema, match="elsewhere.Other"):
        Codec(registry_client=registry).decode(b"\x00" + sid.to_bytes(4, "big") + zz(1))


def test_unreachable_registry_is_fatal_not_a_dead_letter():
    class Down:
        def get_schema(self, schema_id):
            raise ConnectionError("connection refused")

    with pytest.raises(FatalError, match="unreachable"):
        Codec(registry_client=Down()).decode(b"\x00\x00\x00\x00\x01" + req_body())


def test_registry_refusing_registration_is_fatal():
    class Refuses:
        def register_schema(self, subject, schema):
            raise ConnectionError("connection refused")

    with pytest.raises(FatalError, match="cannot register inferlog.InferenceRequest"):
        Codec(framing="confluent", registry_client=Refuses()).encode(REQUEST, request())


def test_wrong_schema(codec):
    data = codec.encode(RESULT, RECORDS["result-generation"][1])
    with pytest.raises(WrongSchema, match="expected inferlog.InferenceRequest, got inferlog.InferenceResult"):
        codec.decode(data, expect=REQUEST)


def test_huge_declared_length_allocates_nothing_big():
    data = SO + req_body(request_id=zz(2**62) + b"abc")
    tracemalloc.start()
    try:
        with pytest.raises(TruncatedRecord):
            Codec().decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_decode_accepts_bytes_like_and_refuses_non_bytes():
    data = Codec().encode(REQUEST, request())
    assert Codec().decode(memoryview(data)) == Codec().decode(bytearray(data)) == request()
    with pytest.raises(UnknownFraming):
        Codec().decode(None)
    with pytest.raises(UnknownFraming, match="str"):
        Codec().decode("text")
    with pytest.raises(UnknownFraming, match="int"):
        Codec().decode(5)


# -- encode errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("rec, field", [
    (request(priority="high"), "priority"),
    (request(priority=1.5), "priority"),  # fastavro's writer alone would write 1
    (request(priority=2**40), "priority"),  # ... and this, as a 6-byte "int"
    (request(task="DREAM"), "task"),
    (request(inputs=["ok", 7]), "inputs"),
    (request(parameters={"max_new_tokens": "8"}), "max_new_tokens"),
    ({k: v for k, v in request().items() if k != "request_id"}, "request_id"),
    (request(prioirty=1), "prioirty"),  # a typo must not vanish silently
])
def test_encode_refuses_records_that_do_not_fit(codec, rec, field):
    with pytest.raises(InvalidRequest, match=field):
        codec.encode(REQUEST, rec)


def test_encode_fills_defaults_for_missing_fields_that_have_them():
    rec = {k: v for k, v in request().items() if k not in ("priority", "deadline", "metadata", "tenant")}
    out = Codec().decode(Codec().encode(REQUEST, rec))
    assert (out["priority"], out["deadline"], out["metadata"], out["tenant"]) == (0, None, {}, "default")


def test_encode_unknown_name():
    with pytest.raises(UnknownSchema, match="inferlog.Nope"):
        Codec().encode("inferlog.Nope", {})


# -- configuration ------------------------------------------------------------------------------
def test_confluent_framing_needs_a_registry():
    with pytest.raises(ConfigError, match="schema_registry_url"):
        Codec(framing="confluent")
    with pytest.raises(ConfigError):
        Codec(framing="protobuf")


def test_from_settings():
    from inferlog.settings import Settings

    c = Codec.from_settings(Settings(framing="confluent", schema_registry_url="mock://from-settings"))
    assert c.framing == "confluent"
    assert c.encode(REQUEST, request())[0] == 0
    assert Codec.from_settings(Settings()).encode(REQUEST, request())[:2] == b"\xc3\x01"


# -- properties -------------------------------------------------------------------------------
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
longs = st.integers(-(2**63), 2**63 - 1)
floats32 = st.floats(width=32, allow_nan=False)
requests = st.builds(
    request,
    request_id=texts, tenant=texts, task=st.sampled_from(["EMBED", "GENERATE", "CLASSIFY"]),
    model=st.none() | texts, inputs=st.lists(texts, min_size=1, max_size=4),
    parameters=st.fixed_dictionaries({
        "max_new_tokens": st.none() | st.integers(-(2**31), 2**31 - 1), "temperature": st.none() | floats32,
        "top_p": st.none() | floats32, "seed": st.none() | longs}),
    created_at=longs, priority=st.integers(-(2**31), 2**31 - 1), deadline=st.none() | longs,
    metadata=st.dictionaries(texts, texts, max_size=3),
)
FRAMINGS = st.sampled_from(["single-object", "confluent"])
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _codec(framing: str) -> Codec:
    return Codec(framing=framing, registry_client=SchemaRegistryClient.new_client({"url": "mock://props"}))


CODECS = {f: _codec(f) for f in ("single-object", "confluent")}


@PROPS
@given(rec=requests, framing=FRAMINGS)
def test_property_round_trip(rec, framing):
    c = CODECS[framing]
    assert c.decode(c.encode(REQUEST, rec)) == rec


def _decodes_or_decode_error(c: Codec, data: bytes):
    try:
        out = c.decode(data)
    except DecodeError:
        return None
    assert isinstance(out, dict)
    return out


@PROPS
@given(data=st.binary(max_size=200))
def test_property_arbitrary_bytes_raise_only_decode_errors(data):
    _decodes_or_decode_error(CODECS["confluent"], data)


@PROPS
@given(body=st.binary(max_size=200), framing=FRAMINGS)
def test_property_arbitrary_bodies_behind_valid_headers(body, framing):
    # random bytes alone rarely pass the header; here every example reaches the body decoder
    c = CODECS[framing]
    header = c.encode(REQUEST, request())[: 10 if framing == "single-object" else 5]
    _decodes_or_decode_error(c, header + body)


@PROPS
@given(rec=requests, framing=FRAMINGS, data=st.data())
def test_property_truncation_is_detected(rec, framing, data):
    c = CODECS[framing]
    full = c.encode(REQUEST, rec)
    cut = data.draw(st.integers(1, len(full) - 1))
    # a prefix reads exactly like the whole until it runs out, so it is always "truncated"
    with pytest.raises(TruncatedRecord):
        c.decode(full[:cut])


@PROPS
@given(rec=requests, framing=FRAMINGS, data=st.data())
def test_property_flipped_bytes_decode_or_raise_decode_error(rec, framing, data):
    c = CODECS[framing]
    buf = bytearray(c.encode(REQUEST, rec))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
    _decodes_or_decode_error(c, bytes(buf))


# -- pieces written outside fastavro ---------------------------------------------------------
@given(st.integers(min_value=-2**63, max_value=2**63 - 1))
def test_avro_long_is_the_encoding_fastavro_writes(n):
    fo = io.BytesIO()
    fastavro.schemaless_writer(fo, "long", n)
    assert avro_long(n) == fo.getvalue()


@pytest.mark.parametrize("field", ["request_id", "outputs", "batch", "replay_run_id"])
def test_a_spliced_encoding_is_the_whole_records_encoding(field):
    """The fields around `field` by fastavro, `field` by the caller: the same bytes as encode()."""
    codec = CODECS["single-object"]
    rec = result([{"vector": [0.5, -1.25]}, {"vector": []}])
    schema = next(f["type"] for f in expand_schema(codec.store.raw(RESULT))["fields"] if f["name"] == field)
    fo = io.BytesIO()
    fastavro.schemaless_writer(fo, schema, rec[field])
    assert codec.encode_spliced(RESULT, rec, field, fo.getvalue()) == codec.encode(RESULT, rec)


def test_a_spliced_encoding_of_a_field_the_schema_lacks_is_refused():
    with pytest.raises(UnknownSchema, match="no field 'vectors'"):
        CODECS["single-object"].encode_spliced(RESULT, result([]), "vectors", b"\x00")

"""Avro codec: records (plain dicts) <-> bytes, in one of two framings.

single-object  C3 01 | 8-byte little-endian CRC-64-AVRO fingerprint | Avro binary body
confluent      00 | 4-byte big-endian schema-registry id          | Avro binary body

Decode picks the framing from the first byte, finds the writer schema (any version in
schemas/, or the registry's) and resolves it into the latest local version of the same
record name, so old records in the log read as current ones with defaults filled.

Timestamps stay int epoch milliseconds both ways: the schemas used to (de)serialise have
their logical types stripped. That changes neither the Parsing Canonical Form nor the
fingerprint; what is registered with a registry keeps them.

Every failure to decode is a DecodeError subclass with a message naming what is wrong;
fastavro's own exceptions (EOFError, IndexError, UnicodeDecodeError...) never escape.
"""
from __future__ import annotations

import functools
import io
import json
import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import fastavro
import numpy as np
from fastavro.schema import expand_schema, fingerprint as _fastavro_fingerprint, to_parsing_canonical_form
from fastavro.validation import validate

from .errors import (
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

REQUEST = "inferlog.InferenceRequest"
RESULT = "inferlog.InferenceResult"
DEADLETTER = "inferlog.DeadLetter"

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0
_SO_HEADER = 10  # C3 01 + 8-byte fingerprint
_CF_HEADER = 5  # 00 + 4-byte id
_FILE = re.compile(r"^(?P<name>.+)\.v(?P<version>\d+)\.avsc$")


def _strip_logical(node: Any) -> Any:
    """A copy of a schema (JSON) without logicalType annotations: timestamps stay ints."""
    if isinstance(node, list):
        return [_strip_logical(n) for n in node]
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "logicalType" and "type" in node:
                continue
            # defaults are data, not schema: leave them alone
            out[k] = v if k == "default" else _strip_logical(v)
        return out
    return node


def _parse(schema_json: Any) -> dict:
    # A fresh named-type table per schema: the files redefine shared types (Task, SourcePosition).
    return fastavro.parse_schema(_strip_logical(schema_json), named_schemas={})


def _fingerprint(parsed: dict) -> bytes:
    # fastavro prints the CRC-64-AVRO value little-endian, the byte order single-object uses.
    return bytes.fromhex(_fastavro_fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


@dataclass(frozen=True, slots=True)
class _Writer:
    """What decoding needs once the header named a writer schema."""

    name: str
    version: int | None  # None: a registry schema matching no local version
    writer: dict
    reader: dict | None  # None when the writer is the latest version: no resolution needed


class SchemaStore:
    """All schemas/ files, parsed once."""

    def __init__(self, package: str = "inferlog.schemas"):
        self._raw: dict[str, dict[int, dict]] = {}
        self._parsed: dict[str, dict[int, dict]] = {}
        self._fp: dict[tuple[str, int], bytes] = {}
        self._by_fp: dict[bytes, tuple[str, int, dict]] = {}
        for f in files(package).iterdir():
            m = _FILE.match(f.name)
            if not m:
                continue
            raw = json.loads(f.read_text(encoding="utf-8"))
            parsed = _parse(raw)
            name, version = m["name"], int(m["version"])
            if parsed["name"] != name:
                raise ConfigError(f"{f.name} defines {parsed['name']}, not {name}")
            fp = _fingerprint(parsed)
            if fp in self._by_fp:
                raise ConfigError(f"{f.name} has the same canonical form as {self._by_fp[fp][:2]}")
            self._raw.setdefault(name, {})[version] = raw
            self._parsed.setdefault(name, {})[version] = parsed
            self._fp[name, version] = fp
            self._by_fp[fp] = (name, version, parsed)
        if not self._parsed:
            raise ConfigError(f"no <fullname>.v<N>.avsc schemas found in {package}")

    @classmethod
    @functools.cache
    def default(cls) -> "SchemaStore":
        return cls()

    def names(self) -> list[str]:
        return sorted(self._parsed)

    def versions(self, name: str) -> list[int]:
        return sorted(self._versions(name))

    def _versions(self, name: str) -> dict[int, dict]:
        try:
            return self._parsed[name]
        except KeyError:
            raise UnknownSchema(f"no schema named {name!r}; known: {', '.join(self.names())}") from None

    def _version(self, name: str, version: int | None) -> int:
        vs = self._versions(name)
        if version is None:
            return max(vs)
        if version not in vs:
            raise UnknownSchema(f"{name} has no version {version}; known: {sorted(vs)}")
        return version

    def latest(self, name: str) -> dict:
        """The parsed latest version (logical types stripped: what the codec writes with)."""
        vs = self._versions(name)
        return vs[max(vs)]

    def parsed(self, name: str, version: int | None = None) -> dict:
        return self._parsed[name][self._version(name, version)]

    def raw(self, name: str, version: int | None = None) -> dict:
        """The schema as written in its file (logical types kept): what a registry gets."""
        return self._raw[name][self._version(name, version)]

    def fingerprint(self, name: str, version: int | None = None) -> bytes:
        return self._fp[name, self._version(name, version)]

    def by_fingerprint(self, fp: bytes) -> tuple[str, int, dict]:
        try:
            return self._by_fp[bytes(fp)]
        except KeyError:
            raise UnknownSchema(f"fingerprint {bytes(fp).hex()} names no schema in schemas/") from None


class Codec:
    def __init__(self, framing: str = "single-object", registry_url: str | None = None,
                 registry_client: Any = None, store: SchemaStore | None = None):
        if framing not in ("single-object", "confluent"):
            raise ConfigError(f"framing must be single-object or confluent, got {framing!r}")
        if registry_client is None and registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient  # only Confluent users need it

            registry_client = SchemaRegistryClient.new_client({"url": registry_url})  # mock:// too
        if framing == "confluent" and registry_client is None:
            raise ConfigError("framing=confluent needs schema_registry_url")
        self.framing = framing
        self.store = store or SchemaStore.default()
        self._registry = registry_client
        self._by_fp: dict[bytes, _Writer] = {}
        for name in self.store.names():
            for v in self.store.versions(name):
                self._by_fp[self.store.fingerprint(name, v)] = self._writer(name, v, self.store.parsed(name, v))
        self._by_id: dict[int, _Writer] = {}  # registry id -> writer, filled on first sight
        self._prefix: dict[str, bytes] = {}  # record name -> header to write, filled on first encode
        self._splits: dict[tuple[str, str], tuple[dict, dict]] = {}  # (name, field) -> schemas around it

    @classmethod
    def from_settings(cls, settings) -> "Codec":
        return cls(framing=settings.framing, registry_url=settings.schema_registry_url)

    def _writer(self, name: str, version: int | None, writer: dict) -> _Writer:
        latest = self.store.latest(name)
        same = writer is latest or _fingerprint(writer) == _fingerprint(latest)
        return _Writer(name, version, writer, None if same else latest)

    # -- encode ----------------------------------------------------------------------------
    def encode(self, name: str, record: dict, trusted: bool = False) -> bytes:
        """Encode `record` with the latest version of `name`. `trusted` skips the schema
        check, for records the worker builds itself from typed values (results, dead letters)."""
        prefix = self._prefix.get(name) or self._header(name)
        schema = self.store.latest(name)
        # fastavro's writer silently truncates 1.5 into an int and writes 2**40 into an int
        # field, so validate first; its errors name the field.
        if not trusted:
            try:
                validate(record, schema, raise_errors=True)
            except fastavro.validation.ValidationError as e:
                raise InvalidRequest(f"{name}: {'; '.join(map(str, e.errors))[:500]}") from None
            except Exception as e:
                raise InvalidRequest(f"{name}: {type(e).__name__}: {e}") from None
        fo = io.BytesIO()
        fo.write(prefix)
        try:
            # strict_allow_default: unknown fields (typos) and missing fields without a default fail
            fastavro.schemaless_writer(fo, schema, record, strict_allow_default=True)
        except Exception as e:
            raise InvalidRequest(f"{name}: {type(e).__name__}: {e}") from None
        return fo.getvalue()

    def encode_spliced(self, name: str, record: dict, field: str, encoded: bytes) -> bytes:
        """Encode a trusted `record` of `name` whose `field` the caller has encoded already.

        Avro writes a record as its fields' encodings one after another, so the bytes are
        fastavro's encoding of the fields before `field`, then `encoded`, then fastavro's of
        the fields after it: the same bytes as encode(). For a field that fastavro writes
        slowly, such as the float arrays of embeddings (stages.encode_embeddings)."""
        prefix = self._prefix.get(name) or self._header(name)
        before, after = self._splits.get((name, field)) or self._split(name, field)
        fo = io.BytesIO()
        fo.write(prefix)
        try:
            fastavro.schemaless_writer(fo, before, record)
            fo.write(encoded)
            fastavro.schemaless_writer(fo, after, record)
        except Exception as e:
            raise InvalidRequest(f"{name}: {type(e).__name__}: {e}") from None
        return fo.getvalue()

    def _split(self, name: str, field: str) -> tuple[dict, dict]:
        """Two record schemas: the latest `name`'s fields before `field`, and those after it
        (named types expanded, so that each half stands alone)."""
        full = expand_schema(_strip_logical(self.store.raw(name)))
        names = [f["name"] for f in full["fields"]]
        if field not in names:
            raise UnknownSchema(f"{name} has no field {field!r}")
        i = names.index(field)
        halves = tuple(_parse({"type": "record", "name": f"{name}__{side}_{field}", "fields": fields})
                       for side, fields in (("before", full["fields"][:i]), ("after", full["fields"][i + 1:])))
        self._splits[name, field] = halves
        return halves

    def _header(self, name: str) -> bytes:
        if self.framing == "single-object":
            prefix = SINGLE_OBJECT_MAGIC + self.store.fingerprint(name)
        else:
            from confluent_kafka.schema_registry import Schema

            try:  # RecordNameStrategy: the subject is the record's full name
                schema_id = self._registry.register_schema(name, Schema(json.dumps(self.store.raw(name)), "AVRO"))
            except Exception as e:  # the registry refused or is down: no record's fault
                raise FatalError(f"cannot register {name} with the schema registry: {e}") from e
            self._by_id[schema_id] = self._writer(name, max(self.store.versions(name)), self.store.latest(name))
            prefix = bytes([CONFLUENT_MAGIC]) + schema_id.to_bytes(4, "big")
        self._prefix[name] = prefix
        return prefix

    # -- decode ----------------------------------------------------------------------------
    def decode(self, data: bytes, expect: str | None = None) -> dict:
        return self._decode(data, expect)[1]

    def decode_named(self, data: bytes) -> tuple[str, dict]:
        return self._decode(data, None)

    def _decode(self, data: Any, expect: str | None) -> tuple[str, dict]:
        if not isinstance(data, bytes):
            try:
                data = bytes(memoryview(data)) if data is not None else b""  # not bytes(5): 5 zeros
            except TypeError:
                raise UnknownFraming(f"input is {type(data).__name__}, not bytes") from None
        n = len(data)
        if n == 0:
            raise UnknownFraming("empty input: no framing byte")
        first = data[0]
        if first == 0xC3:
            if n >= 2 and data[1] != 0x01:
                raise UnknownFraming(f"single-object marker C3 followed by {data[1]:02X}, not 01")
            if n < _SO_HEADER:
                raise TruncatedRecord(f"single-object header needs {_SO_HEADER} bytes, got {n}")
            w = self._by_fp.get(data[2:_SO_HEADER])
            if w is None:
                raise UnknownSchema(f"fingerprint {data[2:_SO_HEADER].hex()} names no schema in schemas/")
            start = _SO_HEADER
        elif first == CONFLUENT_MAGIC:
            if n < _CF_HEADER:
                raise TruncatedRecord(f"Confluent header needs {_CF_HEADER} bytes, got {n}")
            schema_id = int.from_bytes(data[1:_CF_HEADER], "big")
            w = self._by_id.get(schema_id) or self._fetch(schema_id)
            start = _CF_HEADER
        else:
            raise UnknownFraming(f"first byte {first:02X} is neither C3 (single-object) nor 00 (Confluent)")
        if expect is not None and w.name != expect:
            raise WrongSchema(f"expected {expect}, got {w.name}")
        return w.name, self._body(w, data, start)

    def _body(self, w: _Writer, data: bytes, start: int) -> dict:
        # fastavro silently wraps varints past 64 bits. Such a varint holds a run of 9+
        # high-bit bytes, so the exact (slower) walk runs only then (translate+find: ~0.2 µs).
        if data.translate(_HIGH_BIT).find(_RUN9, start) >= 0:
            _check(w.writer, data, start)
        fo = io.BytesIO(data)
        fo.seek(start)
        try:
            rec = fastavro.schemaless_reader(fo, w.writer, w.reader)
        except Exception as e:
            _check(w.writer, data, start)  # names the defect precisely when it is structural
            what = f"{w.name} body does not decode: {type(e).__name__}: {e}"
            raise (TruncatedRecord if isinstance(e, EOFError) else SchemaTypeError)(what) from None
        if fo.tell() != len(data):
            raise SchemaTypeError(f"{len(data) - fo.tell()} trailing bytes after the {w.name} record")
        return rec

    def _fetch(self, schema_id: int) -> _Writer:
        if self._registry is None:
            raise UnknownSchema(f"Confluent-framed record (schema id {schema_id}) but no schema registry configured")
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            found = self._registry.get_schema(schema_id)
        except SchemaRegistryError as e:
            if e.http_status_code == 404:
                raise UnknownSchema(f"schema id {schema_id} is not in the registry") from None
            raise FatalError(f"schema registry failed for id {schema_id}: {e}") from e
        except Exception as e:  # unreachable registry: not this record's fault, do not dead-letter
            raise FatalError(f"schema registry unreachable for id {schema_id}: {e}") from e
        try:
            if (found.schema_type or "AVRO") != "AVRO":
                raise ValueError(f"a {found.schema_type} schema")
            writer = _parse(json.loads(found.schema_str))
            name = writer["name"]
        except Exception as e:
            raise UnknownSchema(f"schema id {schema_id} is not a usable Avro record schema: {e}") from None
        if name not in self.store.names():
            raise UnknownSchema(f"schema id {schema_id} is {name}, which has no local schema")
        known = self._by_fp.get(_fingerprint(writer))
        w = known or self._writer(name, None, writer)
        self._by_id[schema_id] = w
        return w


def avro_long(n: int) -> bytes:
    """Avro's binary encoding of an int or long: zigzag, then a base-128 varint, low bits first."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_HIGH_BIT = bytes(b >> 7 for b in range(256))  # byte -> 1 if its continuation bit is set
_RUN9 = b"\x01" * 9


# -- exact structural check --------------------------------------------------------------
# Walks a body with its writer schema, checking what fastavro does not (varints past 64
# bits) and naming what it reports vaguely (negative vs. huge lengths). Off the hot path.
# Ints are bounded at 64 bits like longs, as fastavro reads them: the bound must not depend
# on whether the walk ran; request validation bounds the ints that matter.

# -- the embedding splice: float32 blocks written as Avro writes them ---------------------------
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


def _check(schema: dict, buf: bytes, pos: int) -> None:
    name = schema.get("name", "record")
    try:
        end = _skip(schema, buf, pos, schema.get("__named_schemas") or {})
    except DecodeError as e:
        raise type(e)(f"{name} body: {e.detail}") from None
    except Exception as e:  # a registry schema of a shape the walk does not know
        raise SchemaTypeError(f"{name} body does not decode: {type(e).__name__}: {e}") from None
    if end != len(buf):
        raise SchemaTypeError(f"{len(buf) - end} trailing bytes after the {name} record")


def _varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(buf):
            raise TruncatedRecord(f"body ends inside the varint of {what}")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if n >> 64 or (b & 0x80 and shift >= 64):
            raise SchemaTypeError(f"varint of {what} overflows 64 bits")
        if not b & 0x80:
            return (n >> 1) ^ -(n & 1), pos


def _length(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    size, pos = _varint(buf, pos, what)
    if size < 0:
        raise SchemaTypeError(f"negative length {size} for {what}")
    if size > len(buf) - pos:
        raise TruncatedRecord(f"{what} declares {size} bytes, only {len(buf) - pos} remain")
    return size, pos


_WIDTH = {"null": 0, "boolean": 1, "float": 4, "double": 8}


def _skip(s: Any, buf: bytes, pos: int, names: dict) -> int:
    if isinstance(s, list):
        i, pos = _varint(buf, pos, "union index")
        if not 0 <= i < len(s):
            raise SchemaTypeError(f"union index {i} out of range 0..{len(s) - 1}")
        return _skip(s[i], buf, pos, names)
    t = s if isinstance(s, str) else s["type"]
    if not isinstance(t, str):  # {"type": {...}} wrapping
        return _skip(t, buf, pos, names)
    if t in _WIDTH:
        if pos + _WIDTH[t] > len(buf):
            raise TruncatedRecord(f"body ends inside a {t}")
        return pos + _WIDTH[t]
    if t in ("int", "long"):
        return _varint(buf, pos, t)[1]
    if t in ("string", "bytes"):
        size, pos = _length(buf, pos, t)
        return pos + size
    if t == "fixed":
        if pos + s["size"] > len(buf):
            raise TruncatedRecord(f"body ends inside fixed {s['name']}")
        return pos + s["size"]
    if t == "enum":
        i, pos = _varint(buf, pos, f"enum {s['name']}")
        if not 0 <= i < len(s["symbols"]):
            raise SchemaTypeError(f"enum {s['name']} index {i} out of range 0..{len(s['symbols']) - 1}")
        return pos
    if t == "record":
        for f in s["fields"]:
            pos = _skip(f["type"], buf, pos, names)
        return pos
    if t in ("array", "map"):
        while True:
            count, pos = _varint(buf, pos, f"{t} block count")
            if count == 0:
                return pos
            if count < 0:  # a negative count is followed by the block's byte size
                count = -count
                _, pos = _length(buf, pos, f"{t} block")
            # every item of our schemas takes at least one byte; a larger count is corrupt
            if count > len(buf) - pos:
                raise TruncatedRecord(f"{t} declares {count} items, only {len(buf) - pos} bytes remain")
            width = _WIDTH.get(s["items"]) if t == "array" and isinstance(s["items"], str) else None
            if width is not None:  # e.g. an embedding's floats: skip the block in one step
                pos += count * width
                if pos > len(buf):
                    raise TruncatedRecord(f"body ends inside an array of {s['items']}")
                continue
            for _ in range(count):
                if t == "map":
                    size, pos = _length(buf, pos, "map key")
                    pos += size
                pos = _skip(s["items" if t == "array" else "values"], buf, pos, names)
    if t in names:
        return _skip(names[t], buf, pos, names)
    raise SchemaTypeError(f"unsupported schema type {t!r}")

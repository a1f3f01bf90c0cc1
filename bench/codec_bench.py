"""Codec throughput: µs per record for encode and decode, printed and saved as JSON.

    .venv/bin/python bench/codec_bench.py [--number 20000] [--repeat 7]

Best of `repeat` timings of `number` calls each (the minimum is the least disturbed by
other load on the machine). The Confluent codec uses confluent-kafka's mock registry:
after the first call the schema id is cached, so this times the hot path, not HTTP.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import timeit
from pathlib import Path

import fastavro
import numpy as np

from inferlog.codec import REQUEST, RESULT, Codec, SchemaStore, avro_long, encode_embeddings, union_branch
from inferlog.request import build_request

OUT = Path(__file__).parent / "results" / "codec.json"


def typical_request() -> dict:
    return build_request("embed", ["What is the capital of France?", "Summarise this ticket.", "hello world"],
                         metadata={"trace_id": "4bf92f3577b34da6"})


def cjk_request() -> dict:
    # non-ASCII text makes long high-bit runs, which send decode through the exact varint walk
    return build_request("generate", ["日本語のテキストです", "你好，世界", "Grüße"])


def embedding_result(dim: int = 384) -> dict:
    rng = random.Random(0)
    t = 1_700_000_000_000
    return {
        "request_id": "r-1", "tenant": "default", "task": "EMBED", "status": "OK",
        "outputs": [{"vector": [rng.uniform(-1, 1) for _ in range(dim)]} for _ in range(3)],
        "error": None, "model": {"name": "all-MiniLM-L6-v2", "revision": None, "digest": None},
        "source": {"topic": "inferlog.requests", "partition": 0, "offset": 42},
        "timings": {"created_at": t, "consumed_at": t + 1, "completed_at": t + 9, "infer_ms": 3.5},
        "batch": {"batch_id": "b-1", "size": 3, "tokens": 48}, "worker_id": "w-1", "replay_run_id": None,
    }


def v1_bytes(store: SchemaStore, rec: dict) -> bytes:
    fo = io.BytesIO()
    fo.write(b"\xc3\x01" + store.fingerprint(REQUEST, 1))
    v1 = fastavro.parse_schema(store.raw(REQUEST, 1), named_schemas={})
    fastavro.schemaless_writer(fo, v1, {k: rec[k] for k in (f["name"] for f in v1["fields"])})
    return fo.getvalue()


def us_per_call(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--number", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    from confluent_kafka.schema_registry import SchemaRegistryClient

    codecs = {
        "single-object": Codec(),
        "confluent": Codec(framing="confluent", registry_client=SchemaRegistryClient.new_client({"url": "mock://bench"})),
    }
    cases = {"request": (REQUEST, typical_request()), "request-cjk": (REQUEST, cjk_request()),
             "result-embedding-3x384": (RESULT, embedding_result())}
    figures = {}
    for framing, codec in codecs.items():
        for case, (name, rec) in cases.items():
            data = codec.encode(name, rec)
            assert codec.decode(data) == codec.decode(codec.encode(name, codec.decode(data)))
            n = args.number if case.startswith("request") else max(args.number // 20, 100)
            figures[f"{framing}/{case}"] = {
                "bytes": len(data),
                "encode_us": round(us_per_call(lambda: codec.encode(name, rec), n, args.repeat), 2),
                "decode_us": round(us_per_call(lambda: codec.decode(data), n, args.repeat), 2),
            }
    # what the worker does (consumer/results.py ResultBuilder): trusted (no validation pass), with
    # each output's union branch named in fastavro's tuple notation (below) or left to be found
    codec, res = codecs["single-object"], embedding_result()
    named = {**res, "outputs": [("inferlog.Embedding", o) for o in res["outputs"]]}
    assert codec.encode(RESULT, named, trusted=True) == codec.encode(RESULT, res)
    n = max(args.number // 20, 100)
    figures["single-object/result-embedding-3x384, trusted"] = {
        "bytes": len(codec.encode(RESULT, res, trusted=True)),
        "encode_us": round(us_per_call(lambda: codec.encode(RESULT, res, trusted=True), n, args.repeat), 2),
    }
    # what the worker does now (stages.encode_embeddings): the runner's float32 rows written as
    # blocks, fastavro around them; against fastavro alone with the branch named, per shape
    branch = avro_long(union_branch(codec, RESULT, "outputs", "inferlog.Embedding"))
    for count, dim in ((3, 384), (1, 384), (1, 1)):
        vecs = [o["vector"][:dim] for o in res["outputs"][:count]]
        whole = {**res, "outputs": [("inferlog.Embedding", {"vector": v}) for v in vecs]}
        rows = [{"vector": np.asarray(v, dtype=np.float32)} for v in vecs]

        def spliced(rows=rows):
            return codec.encode_spliced(RESULT, res, "outputs", encode_embeddings(rows, branch))

        assert spliced() == codec.encode(RESULT, whole, trusted=True)
        for case, fn in (("fastavro, union branch named", lambda whole=whole: codec.encode(RESULT, whole, trusted=True)),
                         ("float32 blocks + fastavro around them", spliced)):
            figures[f"single-object/result-embedding-{count}x{dim}, {case}"] = {
                "bytes": len(fn()), "encode_us": round(us_per_call(fn, n if dim > 1 else args.number, args.repeat), 2)}
    old = v1_bytes(codecs["single-object"].store, typical_request())
    figures["single-object/request-v1-into-v2"] = {
        "bytes": len(old),
        "decode_us": round(us_per_call(lambda: codecs["single-object"].decode(old), args.number, args.repeat), 2),
    }

    report = {
        "benchmark": "codec", "unit": "microseconds per record (best of repeats)",
        "number": args.number, "repeat": args.repeat,
        "python": platform.python_version(), "fastavro": fastavro.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(), "figures": figures,
    }
    for key, f in figures.items():
        enc = f"{f['encode_us']:7.2f}" if "encode_us" in f else "      -"
        dec = f"{f['decode_us']:7.2f}" if "decode_us" in f else "      -"
        print(f"{key:62s} {f['bytes']:6d} B  encode {enc} µs  decode {dec} µs")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {OUT}")


if __name__ == "__main__":
    main()

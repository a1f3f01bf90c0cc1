"""Where a replay's commits go, through the worker's Committer (consumer/committer.py): a file
(part files, then the checkpoint that lists them; merged into .parquet or .jsonl at the end) or
a topic (the worker's transactional emitter: outputs and the run group's offsets in one
transaction). Also the flat row format of the files."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from inferlog.codec import DEADLETTER, RESULT, Codec
from inferlog.consumer.emit import CommitAborted, TransactionalEmitter
from inferlog.errors import RestartRequired

from .checkpoint import Checkpoint, ReplayError, fsync_dir

ROW_FIELDS = ("kind", "request_id", "tenant", "task", "status", "reason", "error", "model", "model_revision",
              "model_digest", "source_topic", "source_partition", "source_offset", "created_at", "completed_at",
              "infer_ms", "batch_id", "batch_size", "worker_id", "replay_run_id", "outputs")


def result_row(r: dict) -> dict:
    """A flat row of a result; `outputs` is the Avro outputs as JSON text (lossless: float32 -> double)."""
    m, s, t, b = r["model"], r["source"], r["timings"], r["batch"]
    return {"kind": "result", "request_id": r["request_id"], "tenant": r["tenant"], "task": r["task"],
            "status": r["status"], "reason": None, "error": r["error"], "model": m["name"],
            "model_revision": m["revision"], "model_digest": m["digest"], "source_topic": s["topic"],
            "source_partition": s["partition"], "source_offset": s["offset"], "created_at": t["created_at"],
            "completed_at": t["completed_at"], "infer_ms": t["infer_ms"], "batch_id": b["batch_id"],
            "batch_size": b["size"], "worker_id": r["worker_id"], "replay_run_id": r["replay_run_id"],
            "outputs": json.dumps(r["outputs"], separators=(",", ":"))}


def dead_letter_row(d: dict) -> dict:
    """A dead letter as a row; its raw key/value stay on the request topic at source_*."""
    s = d["source"]
    return {**dict.fromkeys(ROW_FIELDS), "kind": "deadletter", "request_id": d["request_id"], "tenant": d["tenant"],
            "reason": d["reason"], "error": d["detail"], "source_topic": s["topic"], "source_partition": s["partition"],
            "source_offset": s["offset"], "completed_at": d["failed_at"], "worker_id": d["worker_id"],
            "replay_run_id": d["replay_run_id"]}


def row_result(row: dict) -> dict:
    """Back from a result row to the shape of a decoded result (what drift compares)."""
    return {"request_id": row["request_id"], "task": row["task"], "status": row["status"],
            "outputs": json.loads(row["outputs"]) if row["outputs"] else [],
            "model": {"name": row["model"], "revision": row["model_revision"], "digest": row["model_digest"]},
            "source": {"topic": row["source_topic"], "partition": row["source_partition"], "offset": row["source_offset"]},
            "timings": {"created_at": row["created_at"]}, "replay_run_id": row["replay_run_id"]}


def _arrow_schema():
    import pyarrow as pa

    types = {"source_partition": pa.int32(), "source_offset": pa.int64(), "created_at": pa.int64(),
             "completed_at": pa.int64(), "infer_ms": pa.float32(), "batch_size": pa.int32()}
    return pa.schema([(f, types.get(f, pa.string())) for f in ROW_FIELDS])


def write_rows(path: Path, fmt: str, rows: list[dict]) -> None:
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=_arrow_schema()), path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def read_rows(path: Path) -> list[dict]:
    """Rows of a replay output file (.jsonl or .parquet)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


class FileSink:
    """Each commit one part file, then the checkpoint that lists it and moves the offsets."""

    transactional = True  # the offsets are kept with the outputs: in the checkpoint

    def __init__(self, ck: Checkpoint, codec: Codec):
        self.ck, self.codec = ck, codec
        self.fmt = ck.output["format"]
        self.parts = ck.dir / "parts"
        self.parts.mkdir(exist_ok=True)
        listed = set(ck.data["parts"])
        for stray in self.parts.iterdir():  # written after the last checkpoint: not part of the run
            if stray.name not in listed:
                stray.unlink()

    def commit(self, outputs, commits: dict, group_metadata=None) -> None:
        rows = [dead_letter_row(self.codec.decode(o.value, expect=DEADLETTER)) if o.dead
                else result_row(self.codec.decode(o.value, expect=RESULT)) for o in outputs]
        data = self.ck.data
        if rows:  # 1. the part is durable under its final name ...
            name = f"part-{len(data['parts']) + 1:05d}.{self.fmt}"
            tmp = self.parts / f".{name}.tmp"
            write_rows(tmp, self.fmt, rows)
            os.replace(tmp, self.parts / name)
            fsync_dir(self.parts)
            data["parts"].append(name)
        # 2. ... before the checkpoint that lists it and moves the offsets past its records
        dead = sum(r["kind"] == "deadletter" for r in rows)
        self.ck.advance(commits, len(rows) - dead, dead)

    def finish(self) -> None:
        """Merge the listed parts into the output file, then forget the parts."""
        out = Path(self.ck.output["path"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{self.ck.run_id}.tmp")
        parts = [self.parts / n for n in self.ck.data["parts"]]
        if self.fmt == "jsonl":
            with open(tmp, "wb") as f:
                for p in parts:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, f)
                f.flush()
                os.fsync(f.fileno())
        else:
            import pyarrow.parquet as pq

            with pq.ParquetWriter(tmp, _arrow_schema()) as w:
                for p in parts:
                    w.write_table(pq.read_table(p, schema=_arrow_schema()))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
        self.ck.data["status"] = "done"
        self.ck.save()
        shutil.rmtree(self.parts, ignore_errors=True)

    def close(self) -> None:
        pass


class TopicSink:
    """Each commit one transaction of the worker's emitter: outputs and the run group's offsets."""

    transactional = True

    def __init__(self, settings, consumer, ck: Checkpoint, fallback=None, tally=None):
        self.consumer, self.ck, self.tally = consumer, ck, tally  # tally: a shared run member's totals
        # init_transactions fences a crashed run's producer and aborts its open transaction,
        # so the committed offsets read next are final
        self.emitter = TransactionalEmitter(settings, consumer, fallback=fallback,
                                            sweep_also=(settings.replays_topic,) if tally is not None else (),
                                            outputs=(ck.output["topic"], ck.output["deadletter_topic"]))

    def commit(self, outputs, commits: dict, group_metadata=None) -> None:
        dead = sum(o.dead for o in outputs)
        tally = []
        if self.tally is not None:  # the member's totals after this commit, in its transaction
            c = self.ck.data["counts"]
            tally = [self.tally.out({"results": c["results"] + len(outputs) - dead,
                                     "dead_letters": c["dead_letters"] + dead})]
        try:
            self.emitter.commit(outputs + tally, commits, group_metadata)
        except (CommitAborted, RestartRequired) as e:  # nothing of it is visible; the checkpoint is where it was
            raise ReplayError(f"a transaction was aborted ({e}); continue with --resume {self.ck.run_id}") from e
        # the committed offsets in Kafka are the checkpoint; the file keeps the run's totals for
        # the summary (after a crash they may miss the last transactions, never the records)
        self.ck.advance(commits, len(outputs) - dead, dead)

    def finish(self) -> None:
        self.ck.mark_done()

    def close(self) -> None:
        self.emitter.close()

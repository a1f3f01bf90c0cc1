"""`inferlog audit`: what was asked, what was answered, by which model, when.

get     one request by id: the request, every result (original and replays) and any dead
        letter, reading only the partitions its keys hash to (murmur2, as the producers do)
sql     DuckDB SQL over the requests, results and dead letters of a time window
export  the same tables of a window as Parquet files

Requests are read from both tiers' topics of every model, and from the shared topics of an old
deployment (topics.request_topics): a tier is its topic, and an audit that read one would miss
every request of the other. Results and dead letters are read likewise from each model's own
topics (results_topic.<model>, deadletter_topic.<model>) and the shared ones of an old deployment
(topics.output_topics). --model reads one model's only.

The click group lives in replay/cli.py; these are its commands.
"""
from __future__ import annotations

import base64
import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import click
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from aiokafka.partitioner import murmur2
from confluent_kafka import KafkaException

from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec
from inferlog.errors import DecodeError, InferlogError
from inferlog.options import setting_option, settings_from, settings_options
from inferlog.topics import output_topics, partition_counts, request_topics
from inferlog.timefmt import iso_ms, parse_duration as duration_ms

from .tables import (DEAD_LETTERS, REQUESTS, RESULTS, SPECS, VECTORS, TableBuilder, identify,
                     in_window, load_tables, records, show_progress)
from .window import Window, parse_time, resolve_window, window_consumer

DEFAULT_GRACE = "1h"


class AuditError(click.ClickException):
    """Bad input (topic, window, SQL, output path): exit 2, nothing written."""

    exit_code = 2


def partition_for(key: bytes, partitions: int) -> int:
    """The partition murmur2 partitioning gives a key (Java's default partitioner, librdkafka's
    murmur2_random): the worker keys results by request_id, so the id names their partition."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def parse_duration(text: str) -> int:
    """inferlog.timefmt.parse_duration (a bare number is ms), refused as a command-line error (exit 2)."""
    try:
        return duration_ms(text)
    except ValueError as e:
        raise AuditError(str(e)) from None


def outcome_topics(settings, models=()) -> tuple[list[str], list[str]]:
    """(results topics, dead-letter topics) that exist: each model's own and the shared pair
    (an old deployment's, or a shared-layout one's), or with `models` those of these models,
    and the shared pair when it exists (it holds their outcomes from before each model had its
    own; readers filter by source topic). AuditError when there is none at all: nothing could
    say what was answered."""
    bases = {"results": settings.results_topic, "deadletter": settings.deadletter_topic}
    if not models:
        found = tuple(output_topics(settings, kind) for kind in bases)
    else:
        shared = partition_counts(settings, list(bases.values()))
        found = tuple(list(dict.fromkeys([*output_topics(settings, kind, list(models)),
                                          *([base] if base in shared else [])]))
                      for kind, base in bases.items())
    if not any(found):
        of = f" of model {', '.join(models)}" if models else ""
        raise AuditError(f"no results or dead-letter topics{of} on {settings.bootstrap_servers} (each model's "
                         f"{settings.results_topic}.<model> and {settings.deadletter_topic}.<model>, or the shared "
                         f"{settings.results_topic} and {settings.deadletter_topic})")
    return found


def replay_deadletter_topics(settings, replay_topics) -> list[str]:
    """A replay to topic T writes its dead letters to T.deadletter (the replay default):
    read those that exist along with T."""
    if not replay_topics:
        return []
    c = window_consumer(settings)
    try:
        names = set(c.list_topics(timeout=10).topics)
    finally:
        c.close()
    return [f"{t}.deadletter" for t in replay_topics if f"{t}.deadletter" in names]


# -- get -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hit:
    """A record found for the id, with where it lies."""

    topic: str
    partition: int
    offset: int
    kafka_ts: int
    key: bytes | None
    record: dict


@dataclass
class Lookup:
    request_id: str
    request: Hit | None = None
    results: list[Hit] = field(default_factory=list)
    dead_letters: list[Hit] = field(default_factory=list)
    read: Counter = field(default_factory=Counter)  # records fetched from Kafka, per topic

    @property
    def found(self) -> bool:
        return bool(self.request or self.results or self.dead_letters)

    @property
    def records_read(self) -> int:
        return sum(self.read.values())


def _split(w: Window, key: bytes | None) -> tuple[Window, Window]:
    """(the key's partition, the others); with no key nothing is known: (all, none)."""
    if key is None:
        return w, replace(w, ranges=())
    p = partition_for(key, len(w.ranges))  # an unrestricted window of one topic holds every partition
    return (replace(w, ranges=tuple(r for r in w.ranges if r.partition == p)),
            replace(w, ranges=tuple(r for r in w.ranges if r.partition != p)))


def lookup(settings, request_id: str, *, since_ms: int | None = None, until_ms: int | None = None,
           grace_ms: int = parse_duration(DEFAULT_GRACE), replay_topics: tuple[str, ...] = (),
           codec: Codec | None = None, models: tuple[str, ...] = ()) -> Lookup:
    """Everything the log holds about one request_id.

    The window bounds when the request was made. Results and dead letters come later: they
    are looked for up to `until + grace` on the live topics and without an upper bound on
    replay topics (a replay may run any time after). Results are read from every results
    topic (outcome_topics: each model's, or those of `models`), from the one partition their
    key hashes to in each; the request is one fetch at the source position a result
    names, else a scan of the window on both request topics (the partitions its id hashes
    to first, since the SDK keys by request_id); a dead letter is keyed by the request's
    key, so its partition follows too once the request is known. `read` lists every topic
    the lookup covered, with 0 for those it needed no record of.
    """
    codec = codec or Codec.from_settings(settings)
    out = Lookup(request_id)
    rid = request_id.encode()
    after = None if until_ms is None else until_ms + grace_ms
    res_topics, dl_topics = outcome_topics(settings, models)  # AuditError when there is none
    c = window_consumer(settings)  # metadata and offsets_for_times only; reads use their own

    def window(topic, until, **kw) -> Window:
        out.read[topic] += 0  # covered, even if nothing of it is read
        return resolve_window(settings, topic, since=since_ms, until=until, consumer=c, **kw)

    def scan(w: Window, expect: str, since: int | None, until: int | None, first: bool = False) -> list[Hit]:
        hits = []
        for m in records(settings, w, show_progress(w, None)):
            out.read[m.topic()] += 1
            value, ts = m.value() or b"", m.timestamp()[1]
            # the id is a plain Avro string inside the value: skip the decode of other records
            if rid not in value or not in_window(ts, since, until):
                continue
            try:
                rec = codec.decode(value, expect=expect)
            except DecodeError:
                continue
            rec = identify(rec, codec)
            if rec["request_id"] == request_id:
                hits.append(Hit(m.topic(), m.partition(), m.offset(), ts, m.key(), rec))
                if first:
                    break
        return hits

    try:
        # resolve every window first: an unknown topic fails before any reading
        # (window, upper time edge) per topic; replay topics are read to their end
        # each topic may have its own partition count: the id's partition is computed per topic
        results = [(_split(window(t, after), rid)[0], after) for t in res_topics if t not in replay_topics]
        results += [(_split(window(t, None), rid)[0], None) for t in replay_topics]
        # the tier is not known yet: the id's partition of each request topic, then the rest
        splits = [_split(window(t, until_ms), rid) for t in request_topics(settings, list(models))]
        requests = [mine for mine, _ in splits] + [rest for _, rest in splits]
        replay_dead = replay_deadletter_topics(settings, replay_topics)
        dead = [(window(t, after), after) for t in dl_topics if t not in replay_dead]
        dead += [(window(t, None), None) for t in replay_dead]
        for w, until in results:
            out.results += scan(w, RESULT, since_ms, until)
        if out.results:
            src = out.results[0].record["source"]
            try:
                one = resolve_window(settings, src["topic"], consumer=c,
                                     offsets=f"{src['partition']}:{src['offset']}-{src['offset'] + 1}")
                found = scan(one, REQUEST, None, None)  # the source position is exact: no time filter
                out.request = found[0] if found else None
            except InferlogError:  # the source topic is gone: fall back to the scan
                pass
        for w in requests if out.request is None else ():
            found = scan(w, REQUEST, since_ms, until_ms, first=True)
            if found:
                out.request = found[0]
                break
        key = out.request.key if out.request else None
        for w, until in dead:
            out.dead_letters += scan(_split(w, key)[0], DEADLETTER, since_ms, until)
    finally:
        c.close()
    return out


def _between(since_ms: int | None, until_ms: int | None) -> str:
    return (f"between {'the beginning' if since_ms is None else iso_ms(since_ms)} and "
            f"{'now' if until_ms is None else iso_ms(until_ms)}")


def _pos(topic: str, partition: int, offset: int) -> str:
    return f"{topic} p{partition}@{offset}"


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _outputs(rec: dict) -> str:
    outs = rec["outputs"]
    if not outs:
        return f"none ({rec['error']})" if rec["error"] else "none"
    o = outs[0]
    if "vector" in o:
        return f"{len(outs)} embedding(s), dim {len(o['vector'])}"
    if "text" in o:
        return f"{len(outs)} generation(s): {_short(o['text'])} ({o['tokens']} tokens, {o['finish_reason']})"
    return f"{len(outs)} label(s): {o['label']} ({o['score']:.3f})"


def render(found: Lookup) -> str:
    """The lookup as a block for people."""
    lines = []
    if (h := found.request) is not None:
        r, p = h.record, h.record["parameters"]
        params = ", ".join(f"{k}={v}" for k, v in p.items() if v is not None) or "defaults"
        lines += [f"request {found.request_id}   {_pos(h.topic, h.partition, h.offset)}   kafka time {iso_ms(h.kafka_ts)}",
                  f"  tenant     {r['tenant']}   task {r['task']}   model {r['model'] or '(the worker default)'}"
                  f"   priority {r['priority']}",
                  f"  created    {iso_ms(r['created_at'])}   deadline {iso_ms(r['deadline'])}   parameters {params}",
                  f"  inputs     {len(r['inputs'])}: " + ", ".join(_short(t, 40) for t in r["inputs"][:3])
                  + (" …" if len(r["inputs"]) > 3 else "")]
    else:
        lines.append(f"request {found.request_id}   not found in the window (only its outputs are)")
    for i, h in enumerate(found.results, 1):
        r, t, b, m, s = h.record, h.record["timings"], h.record["batch"], h.record["model"], h.record["source"]
        kind = f"replay {r['replay_run_id']}" if r["replay_run_id"] else "original"
        lines += [f"result {i}/{len(found.results)} ({kind})   {_pos(h.topic, h.partition, h.offset)}"
                  f"   kafka time {iso_ms(h.kafka_ts)}",
                  f"  status     {r['status']}" + (f"   error {r['error']}" if r["error"] else ""),
                  f"  model      {m['name']}   revision {m['revision'] or '-'}   digest {m['digest'] or '-'}",
                  f"  source     {_pos(s['topic'], s['partition'], s['offset'])}",
                  f"  timings    created {iso_ms(t['created_at'])}   consumed +{t['consumed_at'] - t['created_at']} ms"
                  f"   completed +{t['completed_at'] - t['created_at']} ms   infer {t['infer_ms']:.1f} ms",
                  f"  batch      {b['batch_id'] or '-'}   size {b['size']}   tokens {b['tokens']}",
                  f"  worker     {r['worker_id']}",
                  f"  outputs    {_outputs(r)}"]
    for h in found.dead_letters:
        r, s = h.record, h.record["source"]
        lines += [f"dead letter   {_pos(h.topic, h.partition, h.offset)}   kafka time {iso_ms(h.kafka_ts)}",
                  f"  reason     {r['reason']}: {r['detail']}",
                  f"  source     {_pos(s['topic'], s['partition'], s['offset'])}",
                  f"  failed     {iso_ms(r['failed_at'])}   worker {r['worker_id']}"
                  + (f"   replay {r['replay_run_id']}" if r["replay_run_id"] else "")]
    if not found.results and not found.dead_letters:
        lines.append("no result and no dead letter yet")
    read = ", ".join(f"{t} {n}" for t, n in found.read.items())
    lines.append(f"read {found.records_read} records ({read})")
    return "\n".join(lines)


def _jsonable(v):
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def as_json(found: Lookup) -> str:
    def hit(h: Hit | None):
        return None if h is None else {"topic": h.topic, "partition": h.partition, "offset": h.offset,
                                       "kafka_ts": h.kafka_ts,
                                       "key": None if h.key is None else h.key.decode("utf-8", "replace"),
                                       "record": h.record}

    return json.dumps({"request_id": found.request_id, "request": hit(found.request),
                       "results": [hit(h) for h in found.results],
                       "dead_letters": [hit(h) for h in found.dead_letters],
                       "records_read": dict(found.read)}, default=_jsonable, indent=2)


# -- sql / export ------------------------------------------------------------------------------
def run_sql(tables: dict[str, pa.Table], query: str) -> pa.Table:
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")  # timestamps print as they are stored, not local time
        for name, t in tables.items():
            con.register(name, t)
        rel = con.sql(query)
        if rel is None:
            raise AuditError("the statement returns no rows: audit sql runs a query (SELECT or WITH ...)")
        return rel.to_arrow_table()
    except duckdb.Error as e:
        raise AuditError(f"SQL error: {e}") from None
    finally:
        con.close()


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, datetime):
        return v.isoformat(timespec="milliseconds")
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s if len(s) <= 48 else s[:47] + "…"


def format_table(t: pa.Table) -> str:
    # column-wise: duplicate column names (SELECT * over a join) must not collapse
    cols = [[_cell(v) for v in c.to_pylist()] for c in t.columns]
    widths = [max([len(n), *map(len, c)]) for n, c in zip(t.column_names, cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(t.column_names), line("-" * w for w in widths), *(line(r) for r in zip(*cols))]
    return "\n".join(out + [f"({t.num_rows} row{'s' * (t.num_rows != 1)})"])


def write_table(t: pa.Table, path: Path) -> None:
    """CSV or Parquet by suffix, written next to `path` then renamed: never half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if path.suffix.lower() == ".parquet":
            pq.write_table(t, tmp)
        else:  # DuckDB writes list and map columns to CSV, pyarrow's writer refuses them
            with duckdb.connect() as con:
                con.execute("SET TimeZone = 'UTC'")
                con.from_arrow(t).write_csv(str(tmp), header=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _empty(drop: tuple[str, ...]) -> dict[str, pa.Table]:
    return {s.name: TableBuilder(s, None, drop).table() for s in SPECS}


def load_window(settings, since_ms, until_ms, replay_topics=(), vectors=False, progress=None, models=()):
    """The tables of the window. Requests come from every model's request topics (and the shared
    ones of an old deployment), or from those of `models` only; results and dead letters from
    every model's results and dead-letter topics (outcome_topics) and the replay topics. With
    `models`, results and dead letters are those of these models' requests only (by their
    source topic)."""
    drop = () if vectors else VECTORS
    asked = request_topics(settings, list(models))
    if models and not asked:
        raise AuditError(f"no request topics of model {', '.join(models)} on {settings.bootstrap_servers}")
    res_topics, dl_topics = outcome_topics(settings, models)
    sources = [(REQUESTS, asked), (RESULTS, list(dict.fromkeys([*res_topics, *replay_topics]))),
               (DEAD_LETTERS, list(dict.fromkeys([*dl_topics, *replay_deadletter_topics(settings, replay_topics)])))]
    built = load_tables(settings, sources, since_ms, until_ms, codec=Codec.from_settings(settings),
                        drop=drop, progress=progress)
    if not any(b.rows for b in built.values()):
        topics = ", ".join(t for _, ts in sources for t in ts)
        raise AuditError(f"no records {_between(since_ms, until_ms)} on {topics}")
    # stderr, so that stdout stays the answer: which topics the window covered, rows from each
    for spec, topics in sources:
        b = built[spec.name]
        skipped = f", {b.undecodable} undecodable skipped" if b.undecodable else ""
        each = ", ".join(f"{t} {b.by_topic[t]}" for t in topics)
        click.echo(f"{spec.name}: {b.rows} rows from {each} (read {b.read} records{skipped})", err=True)
    tables = {name: b.table() for name, b in built.items()}
    if models:  # results and dead letters of these models' requests only
        for spec in (RESULTS, DEAD_LETTERS):
            t = tables[spec.name]
            tables[spec.name] = t.filter(pc.is_in(t["source_topic"], value_set=pa.array(asked, pa.string())))
    return tables


# -- the commands ------------------------------------------------------------------------------
def audit_options(f):
    opts = [
        click.option("--since", help="Window start, inclusive: ISO 8601, -2h/-30m/-1d, now, or epoch ms."),
        click.option("--until", help="Window end, exclusive (default: now)."),
        click.option("--tz", help="Time zone of ISO times without an offset (default UTC)."),
        click.option("--model", "models", multiple=True, metavar="NAME",
                     help="Only the requests of this served model, and their results and dead letters "
                          "(repeatable; default: every model's)."),
        click.option("--replay-topic", "replay_topics", multiple=True,
                     help="Also read results from this replay topic, and dead letters from "
                          "<topic>.deadletter when it exists (repeatable)."),
        settings_options("connection", "requests_topic", "high_priority_topic", "topic_layout", "results_topic",
                         "deadletter_topic", "framing", "schema_registry_url"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@contextmanager
def _reported():
    """Typed errors (unknown topic, bad window, settings) and broker errors become a message
    and exit 2 instead of a traceback."""
    try:
        yield
    except (InferlogError, KafkaException) as e:
        raise AuditError(str(e)) from e


def _setup(since, until, tz, **topics):
    settings = settings_from(topics)
    return settings, (parse_time(since, tz) if since else None), (parse_time(until, tz) if until else None)


def _out_path(out: Path | None, suffixes: tuple[str, ...]) -> None:
    if out is not None and out.suffix.lower() not in suffixes:
        raise AuditError(f"--out {out}: the name must end in {' or '.join(suffixes)}")


@click.command("get")
@click.argument("request_id")
@audit_options
@click.option("--grace", default=DEFAULT_GRACE, show_default=True,
              help="How long after --until results and dead letters are still looked for.")
@click.option("--json", "as_json_", is_flag=True, help="One JSON object instead of the readable block.")
def audit_get(request_id, since, until, tz, models, replay_topics, grace, as_json_, **topics):
    """The request REQUEST_ID, every result for it (original and replays) and any dead letter.

    --since/--until say when the request was made; with them only that part of the log is read.
    Exit 1 when nothing is found.
    """
    with _reported():
        settings, since_ms, until_ms = _setup(since, until, tz, **topics)
        found = lookup(settings, request_id, since_ms=since_ms, until_ms=until_ms, grace_ms=parse_duration(grace),
                       replay_topics=tuple(replay_topics), models=tuple(models))
    if not found.found:
        raise click.ClickException(f"no request, result or dead letter with request_id {request_id!r} "
                                   f"{_between(since_ms, until_ms)} (read {found.records_read} records)")
    click.echo(as_json(found) if as_json_ else render(found))


@click.command("sql")
@click.argument("query")
@audit_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the answer to FILE.csv or FILE.parquet instead of printing it.")
@click.option("--vectors", is_flag=True, help="Load results.embeddings (one float list per output; heavy).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: big windows).")
def audit_sql(query, since, until, tz, models, replay_topics, out, vectors, progress, **topics):
    """Run QUERY (DuckDB SQL) over the tables requests, results and dead_letters of the window.

    requests holds both tiers (column tier: high or normal); rows per topic go to stderr.

    \b
    inferlog audit sql "SELECT tenant, count(*) FROM requests GROUP BY 1" --since -1d
    """
    with _reported():
        _out_path(out, (".csv", ".parquet"))
        settings, since_ms, until_ms = _setup(since, until, tz, **topics)
        run_sql(_empty(() if vectors else VECTORS), query)  # a bad query fails before any reading
        answer = run_sql(load_window(settings, since_ms, until_ms, tuple(replay_topics), vectors, progress,
                                     tuple(models)), query)
    if out is None:
        click.echo(format_table(answer))
    else:
        write_table(answer, out)
        click.echo(f"wrote {answer.num_rows} rows to {out}", err=True)


@click.command("export")
@audit_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="parquet: a directory for requests.parquet, results.parquet, dead_letters.parquet; "
                   "openai-batch: the output FILE.jsonl.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "openai-batch"]), default="parquet", show_default=True,
              help="openai-batch: the OpenAI Batch API output file of the requests `inferlog produce --format "
                   "openai-batch` published in the window (one line per custom_id answered).")
@click.option("--grace", default=DEFAULT_GRACE, show_default=True,
              help="openai-batch: how long after --until results and dead letters are still looked for.")
@setting_option("model", "--tokenizer", help="openai-batch: the model directory whose tokenizer counts "
                                              "usage.prompt_tokens.")
@click.option("--vectors", is_flag=True, help="Include results.embeddings.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: big windows).")
def audit_export(since, until, tz, models, replay_topics, out, fmt, grace, vectors, progress, **topics):
    """Write the window's requests, results and dead letters as Parquet files to --out, or
    (--format openai-batch) the OpenAI Batch API output file of its batch requests.

    \b
    inferlog audit export --since -1d --out audit/
    inferlog audit export --since 2026-12-01 --format openai-batch --out batch_output.jsonl

    openai-batch exits 1 when some requests of the window have no outcome yet (their
    custom_ids are listed; the file holds the others)."""
    if fmt == "openai-batch":
        return _export_openai_batch(since, until, tz, out, grace, progress, replay_topics, topics, tuple(models))
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out}: a directory for the Parquet files (this is a file)")
    with _reported():
        settings, since_ms, until_ms = _setup(since, until, tz, **topics)
        tables = load_window(settings, since_ms, until_ms, tuple(replay_topics), vectors, progress, tuple(models))
    out.mkdir(parents=True, exist_ok=True)
    for name, t in tables.items():
        write_table(t, out / f"{name}.parquet")
        click.echo(f"{out / name}.parquet: {t.num_rows} rows", err=True)


def _export_openai_batch(since, until, tz, out: Path, grace, progress, replay_topics, topics, models=()) -> None:
    from inferlog.producer.openai_api import Tokenizer

    from .openai_batch import export_openai_batch

    if replay_topics:
        raise click.UsageError("--format openai-batch answers from the original results; --replay-topic does not apply")
    with _reported():
        _out_path(out, (".jsonl",))
        settings, since_ms, until_ms = _setup(since, until, tz, **topics)
        ex = export_openai_batch(settings, out, since_ms, until_ms, parse_duration(grace),
                                 Tokenizer(settings.model), progress, models,
                                 outputs=outcome_topics(settings, models))  # AuditError when there is none
    click.echo(f"{out}: {ex.written} of {ex.requests} batch requests ({ex.failed} errors)", err=True)
    if not ex.requests:
        raise click.ClickException(f"no batch requests (with a custom_id) {_between(since_ms, until_ms)}")
    if ex.unanswered:
        shown = ", ".join(ex.unanswered[:10]) + (" ..." if len(ex.unanswered) > 10 else "")
        raise click.ClickException(f"{len(ex.unanswered)} not answered yet (not written): {shown}")

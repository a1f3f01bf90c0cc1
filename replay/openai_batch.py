"""`inferlog audit export --format openai-batch`: the Batch API output file of the requests
that `inferlog produce --format openai-batch` put on the log.

The requests of the window (both tiers) that carry a batch line's custom_id are matched with
their original results (not replays) and dead letters, read up to `until + grace` from every
model's results and dead-letter topics (or those of the models asked); each
becomes one output line in the order the requests were logged: its endpoint's response body
(producer/openai_api.py, the same as the gateway answers) with status 200, or the error its
dead letter maps to. Requests not answered yet are counted, not written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec
from inferlog.producer import openai_api as oai
from inferlog.topics import output_topics, request_topics

from .tables import decoded
from .window import resolve_window, window_consumer


@dataclass
class Export:
    requests: int = 0  # the window's requests with a custom_id
    written: int = 0
    failed: int = 0  # of written: error lines
    unanswered: list[str] = field(default_factory=list)  # custom_ids with no outcome yet


def export_openai_batch(settings, out: Path, since_ms: int | None, until_ms: int | None, grace_ms: int,
                        tokenizer: oai.Tokenizer | None = None, progress: bool | None = None,
                        models: tuple[str, ...] = (),
                        outputs: tuple[list[str], list[str]] | None = None) -> Export:
    """`outputs`: the (results, dead-letter) topics to read (audit.outcome_topics); default
    topics.output_topics: every model's, or those of `models`."""
    codec = Codec.from_settings(settings)
    after = None if until_ms is None else until_ms + grace_ms
    res_topics, dl_topics = outputs or tuple(output_topics(settings, kind, list(models) or None)
                                             for kind in ("results", "deadletter"))
    c = window_consumer(settings)
    try:  # every window first: an unknown topic fails before any reading
        req_ws = [resolve_window(settings, t, since=since_ms, until=until_ms, consumer=c)
                  for t in request_topics(settings, list(models))]
        res_ws = [resolve_window(settings, t, since=since_ms, until=after, consumer=c) for t in res_topics]
        dl_ws = [resolve_window(settings, t, since=since_ms, until=after, consumer=c) for t in dl_topics]
    finally:
        c.close()

    def read(w, expect: str, until: int | None):
        return decoded(settings, w, expect, codec, since_ms, until, progress)

    wanted: dict[str, tuple[str, dict, list[str]]] = {}  # request_id -> (custom_id, metadata, inputs)
    for w in req_ws:
        for rec in read(w, REQUEST, until_ms):
            meta = rec.get("metadata") or {}
            if oai.META_CUSTOM_ID in meta:
                wanted[rec["request_id"]] = (meta[oai.META_CUSTOM_ID], meta, rec["inputs"])
    results: dict[str, dict] = {}
    for w in res_ws:
        for rec in read(w, RESULT, after):
            if rec["request_id"] in wanted and rec.get("replay_run_id") is None:
                results.setdefault(rec["request_id"], rec)
    dead: dict[str, dict] = {}
    for w in dl_ws:
        for rec in read(w, DEADLETTER, after):
            if rec.get("request_id") in wanted and rec.get("replay_run_id") is None:
                dead.setdefault(rec["request_id"], rec)

    ex = Export(requests=len(wanted))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for rid, (cid, meta, inputs) in wanted.items():
            if rid in results:
                try:
                    n = tokenizer.count(inputs) if tokenizer else 0
                    line = oai.batch_output_line(cid, rid, 200, oai.response(results[rid], meta, n))
                except oai.OpenAIError as e:  # an EXPIRED or ERROR result
                    line, ex.failed = oai.batch_output_line(cid, rid, e.status, e.body()), ex.failed + 1
            elif rid in dead:
                e = oai.failure(dead[rid]["reason"], dead[rid]["detail"])
                line, ex.failed = oai.batch_output_line(cid, rid, e.status, e.body()), ex.failed + 1
            else:
                ex.unanswered.append(cid)
                continue
            f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
            ex.written += 1
    return ex

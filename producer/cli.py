"""`inferlog produce`: publish requests from JSONL (a file or stdin) through the sync SDK."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import Any, Callable, Iterator

import click
from tqdm import tqdm

from inferlog.errors import ConfigError, InvalidRequest, RecordError
from inferlog.options import setting_option, settings_from, settings_options

from .sync import SUBMIT_FIELDS, Producer, ProduceError

SHOWN_INVALID = 10  # the summary lists this many invalid lines; the count covers all


class TokenBucket:
    """At most `rate` acquisitions per second on average, in bursts of at most `burst`."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate / 10)  # a tenth of a second
        self._tokens = self.capacity
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def acquire(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1
        if self._tokens < 0:
            # Sleep off the debt; the next refill counts from before the sleep, so it is repaid.
            self._sleep(-self._tokens / self.rate)


def parse_line(line: str, defaults: dict[str, Any], key_field: str | None = None) -> dict[str, Any]:
    """One JSONL line -> Producer.submit keyword arguments (validated later, by build_request).

    A line is a request object, a shorthand {"text": ...}, or a bare JSON string; fields it
    leaves out come from `defaults` (task, model, tenant).
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"not JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, str):
        obj = {"text": obj}
    if not isinstance(obj, dict):
        raise InvalidRequest(f"expected a JSON object or string, got {type(obj).__name__}")
    fields = dict(obj)
    if "text" in fields:
        if "inputs" in fields:
            raise InvalidRequest('give "text" or "inputs", not both')
        fields["inputs"] = [fields.pop("text")]
    if key_field:
        value = obj.get(key_field, (obj.get("metadata") or {}).get(key_field))
        if key_field not in SUBMIT_FIELDS:
            fields.pop(key_field, None)  # it keys the request; it is not part of it
        if "key" not in obj:
            if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
                raise InvalidRequest(f"no string or integer {key_field!r} field to key the request by")
            fields["key"] = str(value)
    unknown = set(fields) - SUBMIT_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "inputs" not in fields:
        raise InvalidRequest('missing "inputs" (or "text")')
    return {**defaults, **fields}


class OpenAIBatch:
    """Lines of an OpenAI Batch API input file -> Producer.submit keyword arguments: the body as
    the gateway's endpoint takes it (producer/openai_api.py), keyed by its custom_id."""

    def __init__(self, tenant: str, tokenizer_path: str, high_priority: int,
                 locate: Callable[[str], str | None] | None = None):
        from . import openai_api as oai

        self.oai, self.tenant, self.high_priority = oai, tenant, high_priority
        # each line's model's tokenizer: from where its workers say its files are (`locate`, the
        # model registry), else from tokenizer_path
        self.default, self.locate = tokenizer_path, locate
        self.tokenizers: dict[str, Any] = {}
        self.seen: set[str] = set()

    def tokenizer(self, model: str | None):
        path = (self.locate(model) if self.locate and model else None) or self.default
        if path not in self.tokenizers:
            self.tokenizers[path] = self.oai.Tokenizer(path)
        return self.tokenizers[path]

    def parse(self, line: str, defaults: dict, key_field: str | None = None) -> dict[str, Any]:
        cid, url, body = self.oai.parse_batch_line(line)
        if cid in self.seen:  # as the Batch API does: outputs are matched by it
            raise InvalidRequest(f"custom_id {cid!r} repeats an earlier line's")
        try:
            fields = self.oai.to_request(url, body, self.tokenizer(getattr(body, "model", None)), custom_id=cid,
                                         high_priority=self.high_priority)
        except self.oai.OpenAIError as e:
            raise InvalidRequest(e.message) from None
        self.seen.add(cid)
        return {**fields, "tenant": self.tenant, "key": cid}


def _lines(path: str) -> Iterator[bytes]:
    if path == "-":
        yield from click.get_binary_stream("stdin")
        return
    with open(path, "rb") as f:
        yield from f


def _count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as f:
        n, last = 0, b"\n"
        for block in iter(lambda: f.read(1 << 20), b""):
            n, last = n + block.count(b"\n"), block[-1:]
    return n + (last != b"\n")


def _submit(producer: Producer, fields: dict[str, Any], failures: list) -> None:
    try:
        producer.submit(**fields)
    except ProduceError as e:
        # The error is about records sent earlier; this one was not sent yet.
        failures.extend(e.failures)
        producer.submit(**fields)


@click.command("produce", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("file", required=False, default="-", type=click.Path(allow_dash=True, dir_okay=False, exists=True))
@settings_options(
    "connection", "requests_topic", "high_priority_topic", "topic_layout", "high_priority", "models_topic", "task",
    "model_name",
    "publishing",
    "framing", "schema_registry_url",
    flags={"requests_topic": ("--topic", "--requests-topic"), "model_name": ("--model", "--model-name"),
           "produce_rate": ("--rate", "--produce-rate"), "produce_timeout": ("--timeout", "--produce-timeout")},
    helps={"requests_topic": "Normal-tier topic: each line goes to <topic>.<its model> (per-model layout).",
           "high_priority_topic": "High-tier topic, of the lines at or above the high-priority threshold (a line's "
                                  "\"priority\", an OpenAI body's service_tier \"priority\"): <topic>.<its model>.",
           "task": "Task of lines that name none (default: embed).", "model_name": "Model of lines that name none.",
           "key_field": "Key each request by this field of its line (or of its metadata), so that requests sharing "
                        "it keep their order on one partition; a line's own \"key\" wins. Default: the request "
                        "id, spreading requests evenly."})
@click.option("--format", "fmt", type=click.Choice(["jsonl", "openai-batch"]), default="jsonl", show_default=True,
              help="openai-batch: FILE is an OpenAI Batch API input file (custom_id, method, url, body per line); "
                   "each line's custom_id keys its request, and `inferlog audit export --format openai-batch` "
                   "writes the matching output file.")
@setting_option("model", "--tokenizer", help="openai-batch: the model directory whose tokenizer's chat template "
                                              "renders /v1/chat/completions messages.")
@click.option("--check-models/--no-check-models", default=True, show_default=True,
              help="Refuse a line whose model no live worker on these topics serves, or whose task its model does "
                   "not do (the model registry); --no-check-models publishes such lines too, for requests written "
                   "before their workers start.")
def produce(file: str, fmt: str, check_models: bool, **flags) -> None:
    """Publish inference requests from JSONL in FILE (or stdin when FILE is - or absent).

    \b
    Each line is one of:
      {"task": "embed", "inputs": ["a", "b"], "model": ..., "tenant": ..., "parameters": {...},
       "priority": 0, "deadline_ms": ..., "metadata": {...}, "key": ..., "request_id": ...}
      {"text": "one input"}        (task, model, tenant from the options)
      "one input"                  (likewise)
    or, with --format openai-batch, an OpenAI Batch API request:
      {"custom_id": "r1", "method": "POST", "url": "/v1/embeddings", "body": {"model": ..., "input": ...}}
    A request's priority picks its topic: at or above the threshold (INFERLOG_HIGH_PRIORITY, 1),
    or with service_tier "priority" in an OpenAI body, the high tier's.

    A line naming a model that no live worker on these topics serves (UNKNOWN_MODEL), or a task
    its model does not do (UNSUPPORTED_TASK), is invalid too (see --no-check-models); a line
    naming no model is not checked.

    Invalid lines are reported with their line numbers and skipped; the exit status is 1 if
    any line was invalid or any delivery failed, else 0. A cluster that does not answer, or
    refuses the credentials, ends the command at once with one line and status 1.
    """
    try:
        settings = settings_from(flags)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    tenant, rate, key_field, timeout = settings.tenant, settings.produce_rate, settings.key_field, settings.produce_timeout
    defaults = {"task": settings.task or "embed", "model": settings.model_name, "tenant": tenant}
    parse = parse_line
    if fmt == "openai-batch" and key_field:
        raise click.UsageError("--key-field does not apply to --format openai-batch: a line's custom_id keys it")
    if fmt == "openai-batch":
        # each line's model's tokenizer, from where its workers say its files are; else --tokenizer,
        # else INFERLOG_MODEL, else the embedded model
        parse = OpenAIBatch(tenant, settings.model, settings.high_priority,
                            locate=lambda model: producer.models.locate(model)).parse
    bucket = TokenBucket(rate) if rate else None
    invalid: list[tuple[int, str]] = []
    failures: list[tuple[str | None, str, str]] = []
    interrupted = False
    topics: Counter[str] = Counter()  # submitted per topic (a request's priority picks its tier)
    started = time.monotonic()
    producer = Producer(settings, check_models=check_models)
    try:
        producer.connect(timeout)
    except ProduceError as e:
        producer.abandon()
        raise click.ClickException(str(e)) from None
    try:
        # disable=None: no bar when stderr is not a terminal (a file or a pipe gets the summary only)
        with tqdm(total=_count_lines(file), unit="rec", file=sys.stderr, mininterval=0.5,
                  desc="requests", dynamic_ncols=True, disable=None) as bar:
            for n, raw in enumerate(_lines(file), 1):
                bar.update(1)
                if not raw.strip():
                    continue
                try:
                    fields = parse(raw.decode("utf-8"), defaults, key_field)
                    if bucket:
                        bucket.acquire()
                    _submit(producer, fields, failures)
                    topics[settings.topic_for_priority(fields.get("priority") or 0, fields.get("model"))] += 1
                except UnicodeDecodeError as e:
                    invalid.append((n, f"INVALID_REQUEST: not UTF-8 ({e.reason} at byte {e.start})"))
                except RecordError as e:
                    invalid.append((n, f"{e.reason}: {e.detail}"))
    except KeyboardInterrupt:
        interrupted = True  # still flush what was submitted and summarise
    finally:
        try:
            producer.close(timeout=timeout)
        except ProduceError as e:
            failures.extend(e.failures or [(None, e.reason, str(e))])
    elapsed = time.monotonic() - started
    _summary(topics or Counter([settings.tier_topic("normal")]), producer.ledger.delivered, elapsed, invalid,
             failures)
    if interrupted:
        sys.exit(130)
    if invalid or failures:
        sys.exit(1)


def _summary(topics: Counter, sent: int, elapsed: float, invalid: list, failures: list) -> None:
    say = lambda s: click.echo(s, err=True)  # noqa: E731 - stdout stays free for pipes
    where = (f"to {next(iter(topics))}" if len(topics) == 1
             else "(" + ", ".join(f"{n} to {t}" for t, n in sorted(topics.items())) + ")")
    say(f"sent {sent} requests {where} in {elapsed:.2f} s ({sent / max(elapsed, 1e-9):,.0f} records/s)")
    say(f"invalid: {len(invalid)} line(s)" + (" (skipped)" if invalid else ""))
    for n, reason in invalid[:SHOWN_INVALID]:
        say(f"  line {n}: {reason}")
    if len(invalid) > SHOWN_INVALID:
        say(f"  ... and {len(invalid) - SHOWN_INVALID} more")
    say(f"delivery failures: {len(failures)}")
    for rid, reason, detail in failures[:SHOWN_INVALID]:
        say(f"  {rid or '(client)'}: {reason}: {detail}")

"""OpenAI's API shapes on the log: the bodies of /v1/embeddings, /v1/completions and
/v1/chat/completions as inferlog requests, and inferlog results as their responses.

One module for the three places that speak it: the gateway's endpoints, `inferlog produce
--format openai-batch` (a Batch API input file onto the log) and `inferlog audit export
--format openai-batch` (the matching output file). A request made from OpenAI's shape keeps in
its metadata what its response needs and the Avro request has no field for: the endpoint, a
batch line's custom_id, the stop sequences and the embedding encoding. So an output written
days later from the log alone is the answer the endpoint would have given.

What differs from OpenAI's service, on purpose and documented in the README: a completion is
answered whole (`stream: true` sends it as one chunk, then [DONE]); stop sequences cut the
text after generation; n, logprobs, tools and penalties other than their defaults are refused
with a 400, not ignored; without `temperature` the worker's default decoding applies (greedy).
"""
from __future__ import annotations

import base64
import json
import logging
import struct
import threading
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferlog.errors import InvalidRequest

log = logging.getLogger(__name__)

EMBEDDINGS, COMPLETIONS, CHAT = "/v1/embeddings", "/v1/completions", "/v1/chat/completions"
TASKS = {EMBEDDINGS: "embed", COMPLETIONS: "generate", CHAT: "generate"}
# metadata keys of a request made from OpenAI's shape
META_URL, META_CUSTOM_ID, META_STOP = "openai.url", "openai.custom_id", "openai.stop"
META_ENCODING, META_DIMENSIONS = "openai.encoding", "openai.dimensions"
META_TIER = "openai.service_tier"
# OpenAI's service tiers: "priority" (and its alias "fast") is the high tier's topic; every other
# one the normal tier. An answer names the tier that served it: "priority" or "default".
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast")
PRIORITY_TIERS = ("priority", "fast")


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# dead-letter reason -> (HTTP status, OpenAI error type, code)
REASONS = {
    "UNKNOWN_MODEL": (404, "invalid_request_error", "model_not_found"),
    "UNSUPPORTED_TASK": (400, "invalid_request_error", "unsupported_task"),
    "INPUT_TOO_LARGE": (400, "invalid_request_error", "context_length_exceeded"),
    "MODEL_ERROR": (500, "server_error", "model_error"),
    "OUTPUT_TOO_LARGE": (500, "server_error", "output_too_large"),
    "OUTPUT_UNWRITABLE": (500, "server_error", "output_unwritable"),
}


def failure(reason: str, detail: str) -> OpenAIError:
    """A dead letter's reason and detail as the error the endpoint answers."""
    status, type_, code = REASONS.get(reason, (400, "invalid_request_error", reason.lower()))
    return OpenAIError(f"{reason}: {detail}", status, type_, code=code)


# -- request bodies ------------------------------------------------------------------------
class _Body(BaseModel):
    # unknown fields are refused with their name: a silently ignored option is a wrong answer
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    user: str | None = None
    service_tier: Literal[SERVICE_TIERS] | None = Field(
        None, description='"priority" or "fast": published to the high tier\'s topic; the others: the normal tier')


class EmbeddingsBody(_Body):
    input: str | list[str] = Field(description="one text or a list (token arrays are not accepted)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class _Generation(_Body):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionsBody(_Generation):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatBody(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None


BODIES = {EMBEDDINGS: EmbeddingsBody, COMPLETIONS: CompletionsBody, CHAT: ChatBody}


def invalid(errors: list[dict], skip: int = 0, body: type[BaseModel] | None = None) -> OpenAIError:
    """The first of pydantic's validation errors as OpenAI's 400 (`skip`: leading parts of its
    location that are not the body's, e.g. FastAPI's "body"; `body`: the model validated, whose
    fields tell the union members' tags pydantic puts in a location from the body's own names).
    `param` is the field's path ("messages[0].content"), or null: a body that is not JSON (its
    location is a character offset, said in the message), or an error of the body as a whole."""
    first = errors[0]
    if first.get("type") == "json_invalid":  # FastAPI's: ("body", offset)
        loc = first.get("loc", ())
        at = f" (at character {loc[-1]})" if loc and isinstance(loc[-1], int) else ""
        why = (first.get("ctx") or {}).get("error") or first.get("msg")
        return OpenAIError(f"the body is not valid JSON: {why}{at}")
    where = param_path(tuple(first.get("loc", ()))[skip:], body)
    # a union field fails once per member: the member that got furthest says most ("input[1]"
    # for a list with a number in it, where the first error is that the list is not a string)
    for e in errors[1:]:
        deeper = param_path(tuple(e.get("loc", ()))[skip:], body)
        if where and deeper and deeper.startswith((f"{where}[", f"{where}.")) and len(e["loc"]) > len(first["loc"]):
            first, where = e, deeper
    return OpenAIError(f"{where or 'body'}: {first.get('msg')}", param=where)


def param_path(loc: tuple, model: type[BaseModel] | None = None) -> str | None:
    """pydantic's location of an error as OpenAI's `param`: "messages[0].content", "input[1]",
    "logit_bias.a"; None for the body itself. Where a field is a union (`str | list[str]`),
    pydantic's location names the member it tried ("str", "list[str]"): that is not the body's."""
    path, ann = "", model
    for part in loc:
        ann = _optional(ann)
        if _is_union(ann):  # this part is the member's tag; what follows is not known here
            ann = None
            continue
        if part == "[key]":  # pydantic's mark of a dict key (not a value) in error
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
        ann = _inner(ann, part)
    return path or None


def _optional(ann):
    """X from X | None (pydantic's nullable, no member tag in a location)."""
    if get_origin(ann) in (Union, UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _is_union(ann) -> bool:
    return get_origin(ann) in (Union, UnionType)


def _inner(ann, part):
    """The annotation of `part` inside `ann` (a model's field, a list's item, a dict's value); None: unknown."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        field = ann.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    origin, args = get_origin(ann), get_args(ann)
    if origin is list and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def parse_body(url: str, raw: Any) -> BaseModel:
    """A JSON body of endpoint `url`, validated (a batch file's lines; the gateway lets FastAPI do it)."""
    try:
        return BODIES[url].model_validate(raw)
    except ValidationError as e:
        raise invalid(e.errors(), body=BODIES[url]) from None


def _refuse_unsupported(body: _Generation) -> None:
    def no(param: str, why: str):
        raise OpenAIError(f"{param}: {why}", param=param, code="unsupported_parameter")

    if body.n != 1:
        no("n", "one choice per request only")
    if body.logprobs not in (None, False, 0):
        no("logprobs", "not returned by this server")
    if body.presence_penalty or body.frequency_penalty:
        no("presence_penalty" if body.presence_penalty else "frequency_penalty", "not supported (0 only)")
    if body.logit_bias:
        no("logit_bias", "not supported")
    if isinstance(body, CompletionsBody):
        if body.echo:
            no("echo", "not supported")
        if body.best_of not in (None, 1):
            no("best_of", "not supported")
        if body.suffix:
            no("suffix", "not supported")
    if isinstance(body, ChatBody):
        if body.tools or body.tool_choice not in (None, "none"):
            no("tools", "tool calls are not supported")
        if body.response_format and body.response_format.get("type") != "text":
            no("response_format", "only {\"type\": \"text\"}")


def stops(body: _Generation) -> list[str]:
    s = body.stop
    out = [s] if isinstance(s, str) else list(s or [])
    if len(out) > 4 or any(not x for x in out):
        raise OpenAIError("stop: up to 4 non-empty strings", param="stop")
    return out


# -- chat templates -------------------------------------------------------------------------
def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise OpenAIError(f"messages: content parts of type {part.get('type')!r} are not supported (text only)",
                              param="messages")
        parts.append(part.get("text", ""))
    return "".join(parts)


class Tokenizer:
    """The served model's tokenizer, for chat templates and token counts (usage), from `path`
    (INFERLOG_MODEL). The gateway loads it at start-up (load(), off its loop, before /readyz says
    ready); the commands on first use (get()). A model without one, or one that fails to load,
    still serves embeddings and completions, with usage counted as 0 (`error` says why)."""

    def __init__(self, path: str | None):
        self.path, self._tok, self._tried = path, None, False
        self.error: str | None = None
        self._lock = threading.Lock()  # one load, whoever asks first; the others wait for it

    @property
    def loaded(self) -> bool:
        """The load is over: the tokenizer is there, or known not to be (`error`)."""
        return self._tried

    @property
    def status(self) -> str:
        if not self._tried:
            return "loading"
        if self._tok is not None:
            return "loaded"
        return f"unavailable from {self.path}: {self.error}" if self.error else "none (no model configured)"

    def load(self):
        with self._lock:
            if not self._tried:
                try:
                    from transformers import AutoTokenizer

                    self._tok = AutoTokenizer.from_pretrained(self.path) if self.path else None
                except Exception as e:  # noqa: BLE001 - a gateway without the model's files still serves
                    self.error = f"{type(e).__name__}: {e}"
                    log.error("no tokenizer from %s (%s): chat completions are refused (400 no_chat_template) "
                              "and usage is counted as 0; the other endpoints are not affected", self.path, self.error)
                finally:
                    self._tried = True
        return self._tok

    def get(self):
        return self._tok if self._tried else self.load()

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        tok = self.get()
        if tok is None or not getattr(tok, "chat_template", None):
            raise OpenAIError(f"the model's tokenizer ({self.path}) has no chat template: use /v1/completions",
                              param="messages", code="no_chat_template")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)} for m in messages]
        try:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages (roles, order)
            raise OpenAIError(f"messages: the chat template refused them: {e}", param="messages") from None

    def count(self, texts: list[str]) -> int:
        tok = self.get()
        if tok is None:
            return 0
        return sum(len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"])


class Tokenizers:
    """The gateway's tokenizer of each served model, by served name. Its files are where the
    model's workers say they are (the registry's `model`: a directory or a hub id), read from the
    gateway's own disk or hub cache: a model store shared with the workers (the same image or
    volume). Tokenizer files are a few MB, more than a Kafka record holds by default, and a
    deployment that serves a model already has a store for its weights. Each loads once, on a
    thread, as soon as the model is seen (`see`); a call for a model still loading waits for it."""

    def __init__(self, default_name: str | None = None, default_path: str | None = None):
        self.by_name: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()
        if default_name is not None:
            self.by_name[default_name] = Tokenizer(default_path)

    def see(self, name: str, path: str | None) -> Tokenizer:
        """The tokenizer of `name` (from `path` the first time it is seen); its load starts now."""
        with self._lock:
            tok = self.by_name.get(name)
            if tok is None:
                tok = self.by_name[name] = Tokenizer(path)
                threading.Thread(target=tok.load, name=f"tokenizer-{name}", daemon=True).start()
        return tok

    @property
    def loading(self) -> list[str]:
        with self._lock:
            return [n for n, t in self.by_name.items() if not t.loaded]

    def status(self) -> dict[str, str]:
        with self._lock:
            return {n: t.status for n, t in self.by_name.items()}


# -- request: body -> Producer.submit fields -----------------------------------------------
def to_request(url: str, body: BaseModel, tokenizer: Tokenizer | None, custom_id: str | None = None,
               high_priority: int = 1) -> dict:
    """submit() keyword arguments (task, inputs, model, parameters, priority, metadata) for a body
    of `url`. service_tier "priority" gives the request `high_priority` (the high tier's threshold)."""
    fields = _fields(url, body, tokenizer, custom_id)
    if body.service_tier in PRIORITY_TIERS:
        fields["priority"] = high_priority
        fields["metadata"][META_TIER] = "priority"
    return fields


def _fields(url: str, body: BaseModel, tokenizer: Tokenizer | None, custom_id: str | None) -> dict:
    meta = {META_URL: url}
    if custom_id is not None:
        meta[META_CUSTOM_ID] = custom_id
    if isinstance(body, EmbeddingsBody):
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs:
            raise OpenAIError("input: at least one text", param="input")
        meta[META_ENCODING] = body.encoding_format
        if body.dimensions:
            meta[META_DIMENSIONS] = str(body.dimensions)
        return {"task": "embed", "inputs": inputs, "model": body.model, "metadata": meta}
    _refuse_unsupported(body)
    if isinstance(body, ChatBody):
        if tokenizer is None:
            raise OpenAIError("chat completions need the model's tokenizer (its chat template)", code="no_chat_template")
        inputs = [tokenizer.chat_prompt(body.messages)]
        max_tokens = body.max_completion_tokens or body.max_tokens
    else:
        inputs = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not inputs:
            raise OpenAIError("prompt: at least one", param="prompt")
        max_tokens = body.max_tokens
    if s := stops(body):
        meta[META_STOP] = json.dumps(s)
    params = {k: v for k, v in {"max_new_tokens": max_tokens, "temperature": body.temperature,
                                "top_p": body.top_p, "seed": body.seed}.items() if v is not None}
    return {"task": "generate", "inputs": inputs, "model": body.model, "parameters": params or None, "metadata": meta}


# -- response: result -> body ----------------------------------------------------------------
def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    at = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def _vector(v: list[float], encoding: str, dimensions: int | None) -> list[float] | str:
    if dimensions is not None:
        if dimensions > len(v):
            raise OpenAIError(f"dimensions: the model's embeddings have {len(v)}", param="dimensions")
        v = v[:dimensions]  # a cut (Matryoshka style), renormalised as OpenAI's are
        norm = sum(x * x for x in v) ** 0.5 or 1.0
        v = [x / norm for x in v]
    if encoding == "base64":  # little-endian float32, as the openai client decodes it
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii")
    return [float(x) for x in v]


def response(result: dict, metadata: dict, prompt_tokens: int = 0) -> dict:
    """The endpoint's answer (its JSON body) for an inferlog result of a request made from it.
    A result that is not OK (EXPIRED, ERROR) raises the error the endpoint answers instead."""
    rid, url = result["request_id"], metadata.get(META_URL, CHAT)
    if result["status"] != "OK":
        status = 408 if result["status"] == "EXPIRED" else 500
        raise OpenAIError(result.get("error") or result["status"], status,
                          "timeout" if status == 408 else "server_error", code=result["status"].lower())
    model, created = result["model"]["name"], _seconds(result["timings"]["completed_at"])
    outs = result["outputs"]
    if url == EMBEDDINGS:
        enc, dims = metadata.get(META_ENCODING, "float"), metadata.get(META_DIMENSIONS)
        dimensions = int(dims) if dims else None
        data = [{"object": "embedding", "index": i, "embedding": _vector(list(o["vector"]), enc, dimensions)}
                for i, o in enumerate(outs)]
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    stop = json.loads(metadata.get(META_STOP) or "[]")
    choices, generated = [], 0
    for i, o in enumerate(outs):
        text, hit = _cut(o["text"], stop)
        reason = "stop" if hit else o["finish_reason"]
        generated += o["tokens"]
        if url == COMPLETIONS:
            choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": reason})
        else:
            choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None, "finish_reason": reason})
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}
    tier = metadata.get(META_TIER, "default")  # the tier that served it, as OpenAI's answers say
    if url == COMPLETIONS:
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage, "service_tier": tier}
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage, "service_tier": tier}


def _seconds(ts) -> int:
    if hasattr(ts, "timestamp"):  # fastavro decodes timestamp-millis as an aware datetime
        return int(ts.timestamp())
    return int(ts) // 1000


CHUNK_HEAD = ("id", "object", "created", "model", "service_tier")  # what every chunk of a stream repeats


def stream_chunks(body: dict, include_usage: bool = False) -> list[dict]:
    """A whole answer as the chunks of a stream (the worker answers whole: one content chunk)."""
    if body["object"] == "text_completion":
        chunks = [{**{k: body[k] for k in CHUNK_HEAD}, "choices": body["choices"]}]
    else:
        head = {**{k: body[k] for k in CHUNK_HEAD}, "object": "chat.completion.chunk"}
        chunks = []
        for c in body["choices"]:
            i = c["index"]
            chunks += [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]},
                       {**head, "choices": [{"index": i, "delta": {"content": c["message"]["content"]},
                                             "logprobs": None, "finish_reason": None}]},
                       {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                             "finish_reason": c["finish_reason"]}]}]
    if include_usage:
        chunks.append({**{k: chunks[-1][k] for k in CHUNK_HEAD}, "choices": [],
                       "usage": body["usage"]})
    return chunks


def sse(chunks: list[dict]) -> list[bytes]:
    return [f"data: {json.dumps(c, separators=(',', ':'))}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


# -- Batch API files ---------------------------------------------------------------------------
def parse_batch_line(line: str) -> tuple[str, str, BaseModel]:
    """One line of a Batch API input file -> (custom_id, url, validated body). InvalidRequest
    says what is wrong with it (the produce command reports it with its line number)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"not JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("a batch line is a JSON object")
    cid, method, url, body = obj.get("custom_id"), obj.get("method", "POST"), obj.get("url"), obj.get("body")
    if not isinstance(cid, str) or not cid:
        raise InvalidRequest("custom_id: a non-empty string is required")
    if method != "POST":
        raise InvalidRequest(f"method: POST only, got {method!r}")
    if url not in BODIES:
        raise InvalidRequest(f"url: one of {', '.join(BODIES)}, got {url!r}")
    if not isinstance(body, dict):
        raise InvalidRequest("body: a JSON object is required")
    try:
        return cid, url, parse_body(url, body)
    except OpenAIError as e:
        raise InvalidRequest(f"body.{e.message}") from None


def batch_output_line(custom_id: str, request_id: str, status_code: int, body: dict) -> dict:
    """One line of a Batch API output file (a failed request: its error body, with its status)."""
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": None}

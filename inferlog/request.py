"""The request as code sees it: build one (producers) and validate one (producers and workers).

The Avro record is a plain dict (what fastavro reads and writes); `Request` is the typed,
validated view the worker batches. Validation is shared so that a producer refuses, before
sending, exactly what a worker would dead-letter.
"""
from __future__ import annotations

import inspect
import math
import time
import uuid
from datetime import datetime
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping, Sequence  # not typing's: its isinstance is ~10x slower
from typing import Any, TypedDict, TypeVar, Unpack

from .errors import InvalidRequest, InputTooLarge

TASKS = ("EMBED", "GENERATE", "CLASSIFY")


@dataclass(frozen=True, slots=True)
class Limits:
    max_inputs: int = 64
    max_input_bytes: int = 64 * 1024
    max_new_tokens: int = 256

    @classmethod
    def from_settings(cls, s) -> "Limits":
        return cls(s.max_inputs, s.max_input_bytes, s.max_new_tokens_limit)


@dataclass(frozen=True, slots=True)
class Parameters:
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass(slots=True)
class Request:
    request_id: str
    tenant: str
    task: str
    model: str | None
    inputs: list[str]
    parameters: Parameters
    created_at: int  # epoch ms
    priority: int = 0
    deadline: int | None = None  # epoch ms
    metadata: dict[str, str] = field(default_factory=dict)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _ms(v: Any) -> int | None:
    """Epoch ms from an int (what the codec reads and writes) or a datetime (SDK callers)."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v)
    return int(v.timestamp() * 1000)


def validate_request(rec: Mapping[str, Any], limits: Limits = Limits()) -> Request:
    """Check a decoded record (or one about to be encoded). Raises InvalidRequest/InputTooLarge."""
    rid = rec.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > 128:
        raise InvalidRequest("request_id must be a non-empty string of at most 128 characters")
    task = rec.get("task")
    if task not in TASKS:
        raise InvalidRequest(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    inputs = rec.get("inputs")
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise InvalidRequest("inputs must be a non-empty list of strings")
    if len(inputs) > limits.max_inputs:
        raise InputTooLarge(f"{len(inputs)} inputs, more than max_inputs={limits.max_inputs}")
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise InvalidRequest(f"inputs[{i}] is {type(text).__name__}, not a string")
        if not text.strip():
            raise InvalidRequest(f"inputs[{i}] is empty")
        n = len(text.encode("utf-8", "surrogatepass"))
        if n > limits.max_input_bytes:
            raise InputTooLarge(f"inputs[{i}] is {n} bytes, more than max_input_bytes={limits.max_input_bytes}")
    params = _parameters(rec.get("parameters") or {}, limits)
    created = _ms(rec.get("created_at"))
    if created is None or created < 0:
        raise InvalidRequest("created_at must be a non-negative epoch-millisecond timestamp")
    priority = rec.get("priority", 0)
    if not isinstance(priority, int) or not -1000 <= priority <= 1000:
        raise InvalidRequest("priority must be an integer in [-1000, 1000]")
    model = rec.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("model must be null or a non-empty string")
    tenant = rec.get("tenant") or "default"
    if not isinstance(tenant, str) or len(tenant) > 128:
        raise InvalidRequest("tenant must be a string of at most 128 characters")
    deadline = rec.get("deadline")
    if deadline is not None and not isinstance(deadline, (int, datetime)) or isinstance(deadline, bool):
        raise InvalidRequest(f"deadline must be null or epoch milliseconds, got {deadline!r}")
    metadata = rec.get("metadata") or {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in metadata.items()):
        raise InvalidRequest("metadata must map strings to strings")
    return Request(
        request_id=rid,
        tenant=tenant,
        task=task,
        model=model,
        inputs=list(inputs),
        parameters=params,
        created_at=created,
        priority=priority,
        deadline=_ms(deadline),
        metadata=dict(metadata),
    )


NO_PARAMETERS = Parameters()


def _parameters(p: Mapping[str, Any], limits: Limits) -> Parameters:
    mnt, temp, top_p, seed = p.get("max_new_tokens"), p.get("temperature"), p.get("top_p"), p.get("seed")
    if mnt is None and temp is None and top_p is None and seed is None:
        return NO_PARAMETERS  # most requests (every embedding) set none: one shared, frozen instance
    if mnt is not None and (not isinstance(mnt, int) or not 1 <= mnt <= limits.max_new_tokens):
        raise InvalidRequest(f"max_new_tokens must be in [1, {limits.max_new_tokens}], got {mnt!r}")
    if temp is not None and (not _finite(temp) or not 0.0 <= temp <= 10.0):
        raise InvalidRequest(f"temperature must be a finite number in [0, 10], got {temp!r}")
    if top_p is not None and (not _finite(top_p) or not 0.0 < top_p <= 1.0):
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InvalidRequest(f"seed must be a non-negative 63-bit integer, got {seed!r}")
    return Parameters(mnt, None if temp is None else float(temp), None if top_p is None else float(top_p), seed)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class RequestOptions(TypedDict, total=False):
    """The keywords of a request, declared once: build_request and the SDKs' submit() and
    infer() take them as `**options: Unpack[RequestOptions]`. One left out means its
    REQUEST_DEFAULTS value."""

    model: str | None  # None: the worker's default model
    tenant: str
    parameters: Mapping[str, Any] | None  # max_new_tokens, temperature, top_p, seed
    priority: int  # the tier: settings.high_priority and above go to the high topic
    deadline_ms: int | None  # epoch ms; a request still waiting past it is answered EXPIRED
    metadata: Mapping[str, str] | None
    request_id: str | None  # None: a new uuid4


REQUEST_DEFAULTS: RequestOptions = {"model": None, "tenant": "default", "parameters": None, "priority": 0,
                                    "deadline_ms": None, "metadata": None, "request_id": None}

_F = TypeVar("_F", bound=Callable[..., Any])


def spelled_out(options: type, defaults: Mapping[str, Any]) -> Callable[[_F], _F]:
    """Show a function's `**options: Unpack[<options>]` as the keyword parameters they are to
    help() and inspect.signature (type checkers and IDEs read the Unpack itself). Changes
    nothing at call time: the function checks the keywords it gets (check_options)."""
    def apply(fn: _F) -> _F:
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        for name, hint in options.__annotations__.items():
            hint = getattr(hint, "__forward_arg__", hint)  # as written, like the function's own
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name],
                                            annotation=hint))
        fn.__signature__ = sig.replace(parameters=params)
        return fn
    return apply


def check_options(options: Mapping[str, Any], allowed: Mapping[str, Any] = REQUEST_DEFAULTS) -> None:
    """TypeError for a keyword that is not a request's, as Python raises for any function."""
    if unknown := options.keys() - allowed.keys():
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, sorted(unknown)))}; "
                        f"a request takes {', '.join(allowed)}")


@spelled_out(RequestOptions, REQUEST_DEFAULTS)
def build_request(
    task: str,
    inputs: str | Sequence[str],
    *,
    limits: Limits = Limits(),
    **options: Unpack[RequestOptions],
) -> dict:
    """A validated Avro-ready request record (a dict matching InferenceRequest v2)."""
    check_options(options)
    o = {**REQUEST_DEFAULTS, **options}
    parameters = o["parameters"] or {}
    rec = {
        "request_id": o["request_id"] or str(uuid.uuid4()),
        "tenant": o["tenant"],
        "task": str(task).upper(),
        "model": o["model"],
        "inputs": [inputs] if isinstance(inputs, str) else list(inputs),
        "parameters": {k: parameters.get(k) for k in ("max_new_tokens", "temperature", "top_p", "seed")},
        "created_at": now_ms(),
        "priority": o["priority"],
        "deadline": o["deadline_ms"],
        "metadata": dict(o["metadata"] or {}),
    }
    unknown = set(parameters) - set(rec["parameters"])
    if unknown:
        raise InvalidRequest(f"unknown parameters: {', '.join(sorted(unknown))}")
    validate_request(rec, limits)
    return rec

"""What travels between the worker's stages: a consumed record on its way (`Pending`), a
batch's facts (`BatchInfo`), the messages a commit produces (`Out`), and the trace context
copied from a request onto its outputs."""
from __future__ import annotations

import itertools
import re
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

from inferlog.errors import RecordError
from inferlog.request import Request, now_ms

# What the worker copies from a request into its outputs' headers is only its W3C trace context,
# validated: a version-00 traceparent is exactly 55 characters, and a tracestate that propagators
# must keep is at most 512 (W3C Trace Context). Anything else is dropped, so no header a client
# sends can make an output too large to write.
_TRACEPARENT = re.compile(rb"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
TRACESTATE_MAX = 512
_TRACESTATE = re.compile(rb"[\x20-\x7e]*")  # printable ASCII, as its list-members are

def trace_context(headers) -> list[tuple[str, bytes]]:
    """The valid W3C trace context among a record's headers (the first of each name), or []:
    a tracestate without a valid traceparent means nothing, an invalid one is dropped."""
    parent = state = None
    for k, v in headers or ():
        if k == "traceparent" and parent is None:
            parent = v
        elif k == "tracestate" and state is None:
            state = v
    if not isinstance(parent, bytes) or not _TRACEPARENT.fullmatch(parent):
        return []
    if isinstance(state, bytes) and len(state) <= TRACESTATE_MAX and _TRACESTATE.fullmatch(state):
        return [("traceparent", parent), ("tracestate", state)]
    return [("traceparent", parent)]


class Out(NamedTuple):
    """One message to produce inside the commit."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    label: str = ""  # a result's status, or a dead letter's reason (for metrics)
    created_at: int | None = None  # the request's creation time, epoch ms (end-to-end latency)
    dead: bool = False
    tier: str = "normal"
    source: tuple[str, int, int] | None = None  # the request's position (for a fallback dead letter)

    @property
    def size(self) -> int:
        """What the producer counts against message.max.bytes: key, value and headers."""
        return len(self.key or b"") + len(self.value) + sum(len(k.encode()) + len(v or b"") for k, v in self.headers)


@dataclass(slots=True)
class Pending:
    """One consumed record on its way to a result or a dead letter."""

    topic: str
    partition: int
    offset: int
    epoch: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    consumed_at: int  # epoch ms
    arrived: float = 0.0  # monotonic seconds, for the batching clock
    request: Request | None = None
    ids: list[list[int]] = field(default_factory=list)  # token ids per input
    error: RecordError | None = None
    ids_hint: tuple | None = None  # (request_id, tenant) of a record that decoded but did not validate

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)

    @property
    def source(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)

    def trace_headers(self) -> list[tuple[str, bytes]]:
        return trace_context(self.headers)


@dataclass(frozen=True, slots=True)
class BatchInfo:
    batch_id: str
    size: int
    tokens: int

    @staticmethod
    def new(size: int, tokens: int) -> "BatchInfo":
        return BatchInfo(new_batch_id(), size, tokens)


_BATCH_PREFIX = uuid.uuid4().hex[:8]  # per process: ids stay unique across workers
_batch_seq = itertools.count()


def new_batch_id() -> str:
    """16 hex characters, unique per process and across processes (a random prefix and a
    counter): cheaper than a uuid4 per batch, which reads the OS's random source."""
    return f"{_BATCH_PREFIX}{next(_batch_seq) & 0xFFFFFFFF:08x}"


def is_expired(p: Pending, now: int | None = None) -> bool:
    d = p.request.deadline
    return d is not None and (now if now is not None else now_ms()) > d

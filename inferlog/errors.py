"""Typed errors, split by who pays for them.

RecordError: this one record fails. Its `reason` is a stable code that ends up in the
dead letter; the worker goes on. FatalError: this worker cannot go on (fenced producer,
lost broker credentials); it stops loudly. OffsetsUnreadable: a group's committed offsets
could not be read in time; each driver decides what that means for it (the worker stops as on
a FatalError, a replay stops resumable). ConfigError: refused at start-up.
"""
from __future__ import annotations


class InferlogError(Exception):
    """Base of every error inferlog raises on purpose."""


class ConfigError(InferlogError):
    """Settings that cannot work; raised before anything starts."""


class FatalError(InferlogError):
    """The worker must stop (e.g. its transactional producer was fenced)."""

    exit_code = 3


class RestartRequired(FatalError):
    """The process must start again (same worker id) before it can go on safely: a Kafka client
    of it is stuck in a call, and only the end of the process ends what that client may still send."""

    exit_code = 75  # EX_TEMPFAIL


class OffsetsUnreadable(InferlogError):
    """A group's committed offsets could not be read in time (inferlog/committed.py): the driver
    stops instead of guessing where to start. Not a FatalError: nothing is broken (the coordinator
    is away, a transaction stays open), and a replay that catches a failed device must not take
    it for one."""


class RecordError(InferlogError):
    """One record cannot be answered; it becomes a dead letter with `reason`."""

    reason = "RECORD_ERROR"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


# -- bytes that are not a request we can read ------------------------------------------
class DecodeError(RecordError):
    reason = "UNDECODABLE"


class UnknownFraming(DecodeError):
    """The first bytes are neither Avro single-object (C3 01) nor Confluent (00)."""


class TruncatedRecord(DecodeError):
    """The header or the Avro body ends early."""


class SchemaTypeError(DecodeError):
    """The body does not decode with its writer schema (bad varint, bad union index...)."""


class UnknownSchema(DecodeError):
    """A fingerprint or registry id that names no schema we know."""

    reason = "UNKNOWN_SCHEMA"


class WrongSchema(DecodeError):
    """Valid Avro of a schema other than the one this topic carries."""

    reason = "WRONG_SCHEMA"


# -- decoded, but not a request we can serve ---------------------------------------------
class InvalidRequest(RecordError):
    reason = "INVALID_REQUEST"


class UnsupportedTask(RecordError):
    reason = "UNSUPPORTED_TASK"


class UnknownModel(RecordError):
    reason = "UNKNOWN_MODEL"


class InputTooLarge(RecordError):
    reason = "INPUT_TOO_LARGE"


class OutputTooLarge(RecordError):
    """The answer would not fit in one Kafka record."""

    reason = "OUTPUT_TOO_LARGE"


class ModelError(RecordError):
    """The model raised on this request alone (the batch was split down to it)."""

    reason = "MODEL_ERROR"

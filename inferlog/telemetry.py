"""Tracing and logging set-up, shared by every command.

Tracing: the producer injects W3C trace context into Kafka headers; the worker links its
batch spans to it. Spans are exported over OTLP/HTTP when an endpoint is configured
(INFERLOG_OTLP_ENDPOINT or the standard OTEL_EXPORTER_OTLP_ENDPOINT), and not at all
otherwise. Logging: plain lines for people, or one JSON object per line (INFERLOG_LOG_JSON)
with the request and batch ids passed as `extra`.
"""
from __future__ import annotations

import json
import logging

_configured = False


def setup_tracing(settings, service: str = "inferlog-worker") -> bool:
    """Install an OTLP-exporting tracer provider if an endpoint is set. Returns whether it did."""
    global _configured
    if _configured or not settings.otlp_endpoint:
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = settings.otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service,
                                                        "service.instance.id": settings.worker_id}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    _configured = True
    return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra` fields (request_id, batch_id, ...) are kept."""

    _skip = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", as_json: bool = False) -> None:
    handler = logging.StreamHandler()
    if as_json:
        handler.setFormatter(JsonFormatter())
        handler.formatter.converter = __import__("time").gmtime
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

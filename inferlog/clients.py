"""The one place Kafka client configs are built from Settings (confluent-kafka and aiokafka).

Secrets (the SASL password, key passwords) go into the configs only; log `redacted(conf)`.
"""
from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException

from .settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)

_SECRET_KEYS = ("password", "secret", "token", "ssl_context")


class KafkaLog:
    """librdkafka's own log lines, through Python logging (logger `inferlog.kafka`) instead of
    raw stderr, at DEBUG: they are the client's running commentary on connections it retries by
    itself (`FAIL ... Connection refused` after a broker stops, `GETPID ... Not coordinator` on
    a fresh one). What a user must act on reaches inferlog through the error callbacks and
    consume() errors, and is reported there as one clear line. INFERLOG_LOG_LEVEL=DEBUG shows
    them; librdkafka's critical lines stay errors."""

    def __init__(self, name: str = "inferlog.kafka"):
        self.logger = logging.getLogger(name)

    def log(self, level: int, msg: str, *args: Any) -> None:  # confluent-kafka's logger protocol
        self.logger.log(logging.ERROR if level >= logging.CRITICAL else logging.DEBUG, msg, *args)


KAFKA_LOG = KafkaLog()


def confluent_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """librdkafka properties for Producer/Consumer/AdminClient. `extra` are librdkafka keys
    (pass dotted ones as `**{"group.id": ...}`) and win over the settings."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "security.protocol": settings.security_protocol,
        "logger": KAFKA_LOG,
    }
    if settings.kafka_debug:
        conf["debug"] = settings.kafka_debug
    if settings.sasl_mechanism:
        conf["sasl.mechanism"] = settings.sasl_mechanism
    if settings.sasl_username is not None:
        conf["sasl.username"] = settings.sasl_username
    if settings.sasl_password is not None:
        conf["sasl.password"] = settings.sasl_password.get_secret_value()
    if settings.ssl_cafile:
        conf["ssl.ca.location"] = settings.ssl_cafile
    if settings.ssl_certfile:
        conf["ssl.certificate.location"] = settings.ssl_certfile
    if settings.ssl_keyfile:
        conf["ssl.key.location"] = settings.ssl_keyfile
    conf.update(extra)
    return conf


def group_protocol_config(s: Settings) -> dict[str, Any]:
    """How a group of workers (or a shared replay's members) assigns. KIP-848's broker-side
    range assignor balances each request topic on its own (cooperative-sticky balanced the total:
    a worker joining a serving group took all of one tier and none of the other); its rebalances
    are incremental, as cooperative ones were."""
    if s.group_protocol == "consumer":
        return {"group.protocol": "consumer", "group.remote.assignor": s.group_assignor}
    return {"partition.assignment.strategy": "cooperative-sticky", "session.timeout.ms": s.session_timeout_ms}


def consume_ready(consumer, n: int, timeout: float) -> list:
    """Up to `n` messages, waiting at most `timeout` for the first and not at all for the rest.

    confluent-kafka's consume(n, timeout) returns only when it has n messages or the timeout
    has passed: one request reaching an idle worker waited out the whole poll timeout (100 ms
    idle, measured: consume(256, 1.0) returned 1 s after the call, 0.8 s after the send).
    poll() returns on the first message (and serves the same callbacks); what is queued
    behind it is taken without waiting."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(n - 1, 0)] if n > 1 else [first]


# Kafka's "not yet": a controller or leader not there yet, a topic or partition whose
# metadata has not reached this client, a broker that stalled or left the metadata for a
# moment (librdkafka then drops its handle: _DESTROY_BROKER). librdkafka flags few errors
# retriable itself, and none of the admin API's or get_watermark_offsets'.
NOT_YET = frozenset({
    KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._DESTROY_BROKER,
    KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC, KafkaError._WAIT_COORD,
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.BROKER_NOT_AVAILABLE, KafkaError.NOT_CONTROLLER,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
})


def retriable(err: KafkaError) -> bool:
    return err.retriable() or err.code() in NOT_YET


def retry(call: Callable[[], T], what: str, tries: int = 8) -> T:
    """call(), again while it fails with a KafkaException that is retriable (NOT_YET), after
    a pause that doubles from 0.25 s up to 5 s (18 s of pauses over 8 tries): enough for a
    broker to elect, propagate metadata or come back from a stall. The budget is tries, not a
    clock: each try waits for the broker as long as the call's own timeout says. Any other
    error, or the last try's, is raised as it is."""
    pause = 0.25
    for n in range(1, tries):
        try:
            return call()
        except KafkaException as e:
            err = e.args[0]
            if not isinstance(err, KafkaError) or not retriable(err):
                raise
            log.debug("%s: %s; try %d of %d in %.2fs", what, err.str(), n + 1, tries, pause)
        time.sleep(pause)
        pause = min(pause * 2, 5.0)
    return call()  # the last try: whatever it raises is the caller's


def aiokafka_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer/AIOKafkaConsumer/AIOKafkaAdminClient."""
    kw: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        kw["sasl_mechanism"] = settings.sasl_mechanism
    if settings.sasl_username is not None:
        kw["sasl_plain_username"] = settings.sasl_username
    if settings.sasl_password is not None:
        kw["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kw["ssl_context"] = ssl_context(settings)
    return kw


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verifying TLS context: the system CAs, or ssl_cafile; a client cert when configured."""
    ctx = ssl.create_default_context(cafile=settings.ssl_cafile)
    if settings.ssl_certfile:
        ctx.load_cert_chain(settings.ssl_certfile, keyfile=settings.ssl_keyfile)
    return ctx


def redacted(conf: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to log: secret values replaced."""
    return {k: "***" if any(s in k.lower() for s in _SECRET_KEYS) else v for k, v in conf.items()}

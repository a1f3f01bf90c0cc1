"""The synchronous producer SDK (confluent-kafka), and the request envelope both SDKs share.

One path for a request: build_request validates it (exactly what a worker would dead-letter
is refused here, before anything is sent), the codec encodes it, and it goes out keyed by
the caller's affinity key or else its request_id, with trace context and content-type headers,
to the topic of its priority tier. A request that names a model is checked first against the
model registry (inferlog/registry.py, the gateway's rule): a model no live worker serves is
UnknownModel, a task it does not do UnsupportedTask, and nothing is sent. infer() waits for the answer: one shared reader thread per
Producer, started by the first call, completes each caller's future.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future, TimeoutError as FutureTimeout
from functools import partial
from typing import Any, Iterable, Mapping, NamedTuple, Sequence, Unpack

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer as _KafkaProducer, TopicPartition
from opentelemetry import propagate

from inferlog.clients import confluent_config
from inferlog.codec import REQUEST, Codec
from inferlog.errors import InferlogError, InvalidRequest, RecordError, UnknownModel
from inferlog.registry import ModelDirectory, refuse_unserved, request_directory
from inferlog.request import REQUEST_DEFAULTS, Limits, RequestOptions, build_request, check_options, spelled_out
from inferlog.settings import Settings, load_settings

log = logging.getLogger(__name__)

# Errors of the client, not of one record, that no retry mends: the producer is refused its
# credentials, its TLS or its rights. An SDK call that waits (flush, connect) ends on them at once.
CLIENT_FAILURES = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL,
                             KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED,
                             KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED})


class SubmitOptions(RequestOptions, total=False):
    """A request's keywords, and the SDKs' own: `key` pins related requests to one partition
    (ordering, affinity); without it the request_id is the key."""

    key: str | bytes | None


SUBMIT_DEFAULTS: SubmitOptions = {**REQUEST_DEFAULTS, "key": None}
SUBMIT_FIELDS = frozenset({"task", "inputs", *SUBMIT_DEFAULTS})  # of a submit_many entry, or a JSONL line


class ProduceError(InferlogError):
    """Records the broker did not take. `failures` holds (request_id, reason, detail) per record."""

    def __init__(self, message: str, reason: str, failures: Sequence[tuple[str | None, str, str]] = ()):
        super().__init__(message)
        self.reason = reason
        self.failures = list(failures)


class DeliveryLedger:
    """Delivery outcomes, recorded by the client's callbacks and raised at the caller's next
    submit or flush, so that the hot path never checks per message."""

    def __init__(self) -> None:
        self.enqueued = 0  # records the client took
        self.delivered = 0
        self.failed = 0
        self._failures: list[tuple[str | None, str, str]] = []

    def ok(self) -> None:
        self.delivered += 1

    @property
    def undelivered(self) -> int:
        """Records taken but with no delivery report yet. The client's own queue length is not
        this: it also counts its requests and events in flight (two for one record, seen)."""
        return self.enqueued - self.delivered - self.failed

    def fail(self, request_id: str | None, reason: str, detail: str) -> None:
        if request_id is not None:  # None: a client-level error, not one record
            self.failed += 1
        self._failures.append((request_id, reason, detail))

    @property
    def client_failure(self) -> tuple[str, str] | None:
        """(reason, detail) of the first client-level failure waiting to be raised."""
        return next(((reason, detail) for rid, reason, detail in self._failures if rid is None), None)

    def raise_failures(self) -> None:
        if not self._failures:
            return
        failures, self._failures = self._failures, []
        rid, reason, detail = failures[0]
        raise ProduceError(
            f"{len(failures)} delivery failure(s); first: {rid or '(client)'}: {reason}: {detail}",
            reason, failures,
        )


MODELS_WAIT_S = 10.0  # the first request naming a model waits this long, at most, for the registry's answer


class ModelCheck:
    """The SDKs' check of a request's model against the model registry: the gateway's rule
    (inferlog/registry.py refuse_unserved: only workers reading the topics this producer sends
    that model's requests to count;
    until the registry has been read, nothing is refused). The directory is started by the first
    request that names a model (one without pays nothing), which waits until it has read the
    topic or found it unreadable (at most MODELS_WAIT_S), and stopped by stop().
    Disabled (`check_models=False`), nothing is checked: for callers that publish before any
    worker serves, whose requests wait on the topic for a worker to come."""

    def __init__(self, settings: Settings, enabled: bool = True):
        self.s, self.enabled = settings, enabled
        self.directory: ModelDirectory | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def needs_start(self, model: str | None) -> bool:
        return self.enabled and model is not None and self.directory is None

    def start(self) -> ModelDirectory:
        with self._lock:
            if self._stopped:
                raise InferlogError("producer is closed")
            if self.directory is None:
                d = request_directory(self.s).start()
                if not d.wait_settled(MODELS_WAIT_S):
                    log.warning("model registry %s not read (%s): requests are not checked for their model until "
                                "it is", self.s.models_topic, d.error or f"no answer within {MODELS_WAIT_S:g}s")
                self.directory = d
            return self.directory

    def __call__(self, task: str, model: str | None) -> None:
        """UnknownModel / UnsupportedTask for a request nobody serves (may start the directory: blocks)."""
        if not self.enabled or model is None:
            return
        refuse_unserved(self.directory or self.start(), model, task)

    def locate(self, model: str) -> str | None:
        """Where the workers of `model` say its files are (the registry's `model`), when the
        check is on and the registry knows it (may start the directory: blocks)."""
        if not self.enabled:
            return None
        lm = (self.directory or self.start()).find(model)
        return lm.members[0].model if lm else None

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            d, self.directory = self.directory, None
        if d is not None:
            d.stop()


class Envelope(NamedTuple):
    request_id: str
    topic: str  # the tier's topic
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def split_settings(settings: Settings | None, overrides: Mapping[str, Any]) -> tuple[Settings, dict[str, Any]]:
    """Overrides naming a Settings field change the settings; the rest go to the Kafka client."""
    fields = {k: v for k, v in overrides.items() if k in Settings.model_fields}
    client = {k: v for k, v in overrides.items() if k not in fields}
    base = settings if settings is not None else load_settings()
    return (base.with_overrides(**fields) if fields else base), client


class RequestEncoder:
    """submit() arguments -> the record on the wire. Shared by the sync and async producers."""

    def __init__(self, settings: Settings):
        self.codec = Codec.from_settings(settings)
        self.limits = Limits.from_settings(settings)
        self.settings = settings
        self.content_type = (
            f"application/vnd.apache.avro+binary; schema={REQUEST}; framing={settings.framing}".encode()
        )

    def envelope(self, task: str, inputs: str | Sequence[str], *, key: str | bytes | None = None,
                 **options: Unpack[RequestOptions]) -> Envelope:
        check_options(options, SUBMIT_DEFAULTS)  # a misspelt keyword is a TypeError, as for any call
        try:
            rec = build_request(task, inputs, limits=self.limits, **options)
        except (TypeError, ValueError, AttributeError) as e:
            # build_request assumes the types it does not check (a str deadline, say).
            raise InvalidRequest(f"not a valid request: {type(e).__name__}: {e}") from None
        # The encoder refuses what build_request lets through but Avro cannot hold
        # (a non-string metadata value, say), as InvalidRequest too.
        value = self.codec.encode(REQUEST, rec)
        return Envelope(rec["request_id"], self.topic(rec["priority"], rec["model"]), _key(key, rec["request_id"]), value,
                        self.headers())

    def topic(self, priority: int, model: str | None = None) -> str:
        """Each model has its topics, a topic per tier: workers serve the high tier first
        (weighted). A request that names no model goes to the settings' (served_name)."""
        return self.settings.topic_for_priority(priority, model)

    def envelopes(self, requests: Iterable[Mapping[str, Any]]) -> list[Envelope]:
        """Validate and encode every request first, so a bad one means none is sent."""
        out = []
        for i, r in enumerate(requests):
            if not isinstance(r, Mapping):
                raise InvalidRequest(f"requests[{i}] is a {type(r).__name__}, not a mapping")
            problems = []
            if unknown := set(r) - SUBMIT_FIELDS:
                problems.append(f"unknown fields {sorted(unknown)}")
            if missing := {"task", "inputs"} - set(r):
                problems.append(f"missing fields {sorted(missing)}")
            if problems:
                raise InvalidRequest(f"requests[{i}]: {'; '.join(problems)}")
            try:
                out.append(self.envelope(**r))
            except RecordError as e:
                raise type(e)(f"requests[{i}]: {e.detail}") from e
        return out

    def headers(self) -> list[tuple[str, bytes]]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # traceparent (and baggage) only when a span is current
        return [("content-type", self.content_type), *((k, v.encode()) for k, v in carrier.items())]


def check_many(check: ModelCheck, requests: Sequence[Mapping[str, Any]]) -> None:
    """submit_many's model check, after every request validated: the first refused raises, named by its index."""
    for i, r in enumerate(requests):
        try:
            check(r["task"], r.get("model"))
        except RecordError as e:
            raise type(e)(f"requests[{i}]: {e.detail}") from e


def _key(key: str | bytes | None, request_id: str) -> bytes:
    if key is None:
        return request_id.encode()  # unique keys spread evenly over the partitions
    if isinstance(key, bytes):
        return key
    if isinstance(key, str) and key:
        return key.encode()
    raise InvalidRequest(f"key must be a non-empty str or bytes, got {type(key).__name__}")


class Producer:
    """Publishes inference requests; one per process is enough.

    Delivery is asynchronous: a failed delivery is raised as ProduceError by the next
    submit() or flush(), never silently dropped.

    A request naming a model no live worker on its topics serves raises UnknownModel (a task
    the model does not do, UnsupportedTask) and nothing is sent; see ModelCheck.
    `check_models=False` turns that off, for callers that publish before workers start.
    """

    def __init__(self, settings: Settings | None = None, *, check_models: bool = True, **overrides: Any):
        self.settings, client = split_settings(settings, overrides)
        self._encoder = RequestEncoder(self.settings)
        self.models = ModelCheck(self.settings, check_models)
        self.ledger = DeliveryLedger()
        self._closed = False
        self._reader: ResultsReader | None = None  # started by the first infer()
        self._reader_lock = threading.Lock()
        conf = {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,  # a few ms of batching buys most of the throughput
            "compression.type": "lz4",
            # Java-compatible key hashing: the same key lands on the same partition from
            # this SDK, the aiokafka one and any Java client.
            "partitioner": "murmur2_random",
            "client.id": "inferlog-producer",
            "error_cb": self._on_error,
            **client,
        }
        self._producer = _KafkaProducer(confluent_config(self.settings, **conf))

    # -- sending -------------------------------------------------------------------------
    @spelled_out(SubmitOptions, SUBMIT_DEFAULTS)
    def submit(self, task: str, inputs: str | Sequence[str], **options: Unpack[SubmitOptions]) -> str:
        """Validate, encode and enqueue one request; returns its request_id.

        `key` pins related requests to one partition (ordering, affinity); without it the
        request_id is the key. Raises InvalidRequest/InputTooLarge, UnknownModel/UnsupportedTask
        (nothing sent), or ProduceError for an earlier request whose delivery failed.
        """
        self._check()
        env = self._encoder.envelope(task, inputs, **options)
        self.models(task, options.get("model"))
        self._send(env)
        return env.request_id

    def submit_many(self, requests: Iterable[Mapping[str, Any]]) -> list[str]:
        """All requests are validated before any is sent: one bad request raises, nothing is sent."""
        self._check()
        requests = list(requests)
        envs = self._encoder.envelopes(requests)
        check_many(self.models, requests)
        for env in envs:
            self._send(env)
        return [e.request_id for e in envs]

    def _send(self, env: Envelope) -> None:
        cb = partial(self._on_delivery, env.request_id)
        while True:
            try:
                self._producer.produce(env.topic, env.value, env.key, headers=env.headers, on_delivery=cb)
                self.ledger.enqueued += 1
                return
            except BufferError:
                # The local queue is full: let deliveries drain it, then try again.
                self._producer.poll(0.05)

    @spelled_out(SubmitOptions, SUBMIT_DEFAULTS)
    def infer(self, task: str, inputs: str | Sequence[str], *, timeout: float = 30,
              **options: Unpack[SubmitOptions]) -> dict:
        """Submit one request and wait for its result record (request-reply over Kafka).

        The keywords are submit()'s. Raises RequestFailed (reason, detail) when the request ends
        as a dead letter, TimeoutError when no outcome comes within `timeout` seconds. A result
        with status EXPIRED (its deadline passed) is returned like any result.
        """
        env = self._encoder.envelope(task, inputs, **options)
        self.models(task, options.get("model"))
        reader = self._results_reader()
        reader.watch(options.get("model"))  # the model's own outputs, read from now on
        fut = reader.expect(env.request_id)  # before sending: the outcome cannot be missed
        try:
            self._check()
            self._send(env)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    # short slices: serve delivery reports so a failed send surfaces here
                    outcome = fut.result(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
                    break
                except FutureTimeout:
                    self._producer.poll(0)
                    self.ledger.raise_failures()
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"no result for request {env.request_id} within {timeout}s") from None
        finally:
            reader.forget(env.request_id)
        return outcome.result(self._encoder.codec)

    def _results_reader(self) -> "ResultsReader":
        with self._reader_lock:
            if self._closed:
                raise InferlogError("producer is closed")
            if self._reader is None:
                self._reader = ResultsReader(self.settings, self._encoder.codec)
            return self._reader

    def connect(self, timeout: float = 10.0) -> None:
        """Fail fast: return once a broker answers with the cluster's metadata; raise ProduceError
        at once when the client is refused (credentials, TLS, rights), and after `timeout`
        seconds when no broker answers. Sending does not need it (records wait for a broker); a
        command line does, so that it never waits on a cluster it cannot reach. No topic is
        asked for: each model has its own, made by its workers, and a request for a model
        nobody serves is refused by the model check."""
        deadline = time.monotonic() + timeout
        why = "no answer"
        while True:
            self._producer.poll(0)  # serves error_cb
            if (failure := self.ledger.client_failure) is not None:
                raise ProduceError(f"Kafka at {self.settings.bootstrap_servers} refused this client: {failure[1]}",
                                   failure[0])
            try:
                self._producer.list_topics(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                return
            except KafkaException as e:
                why = e.args[0].str()
            if time.monotonic() >= deadline:
                raise ProduceError(f"cannot reach Kafka at {self.settings.bootstrap_servers} "
                                   f"within {timeout:g}s: {why}", "UNREACHABLE")

    def flush(self, timeout: float | None = 30) -> None:
        """Wait until every record is delivered (None: no limit); raise ProduceError for any that
        failed, at once when the client itself is refused (credentials, TLS, rights)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
            self._producer.flush(step)
            left = self.ledger.undelivered
            if not left or self.ledger.client_failure is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        self.ledger.raise_failures()
        if left:
            raise ProduceError(f"{left} records still undelivered after {timeout}s", "FLUSH_TIMEOUT")

    def close(self, timeout: float | None = 30) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout)
        finally:
            self.models.stop()
            if self._reader is not None:
                self._reader.close()
            self._producer.close()

    def abandon(self) -> None:
        """Close without waiting for anything (records not yet delivered are dropped)."""
        self._closed = True
        self.models.stop()
        if self._reader is not None:
            self._reader.close()
        self._producer.purge()
        self._producer.flush(0)

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except InferlogError:
            if exc_type is None:
                raise
            log.exception("closing the producer while handling another error")

    def __len__(self) -> int:
        """Records enqueued but not yet delivered."""
        return self.ledger.undelivered

    # -- delivery reports ----------------------------------------------------------------
    def _on_delivery(self, request_id: str, err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            self.ledger.ok()
        else:
            self.ledger.fail(request_id, err.name(), err.str())

    def _on_error(self, err: KafkaError) -> None:
        # Idempotence makes some errors fatal (e.g. a broken sequence): nothing more will be
        # delivered; a refused client retries forever unless told to stop.
        if err.fatal() or err.code() in CLIENT_FAILURES:
            self.ledger.fail(None, err.name(), err.str())
        else:
            log.debug("kafka client error (the client retries): %s", err)

    def _check(self) -> None:
        if self._closed:
            raise InferlogError("producer is closed")
        self._producer.poll(0)  # serve delivery reports (cheap, never waits) so failures surface now
        self.ledger.raise_failures()


class ResultsReader:
    """One thread per Producer reading every partition of each watched model's results and
    dead-letter topics (from their ends when first watched, no group) and completing the futures
    of waiting infer() calls. Outcomes nobody waits for are skipped undecoded."""

    def __init__(self, settings: Settings, codec: Codec):
        self.s, self.codec = settings, codec
        self._waiters: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watched: set[str] = set()  # results topics read
        self._dead: set[str] = set()  # dead-letter topics read
        self._consumer = Consumer(confluent_config(settings, **{
            "group.id": f"inferlog-replies-{uuid.uuid4().hex}",  # required by the client; never joined
            "enable.auto.commit": False, "isolation.level": "read_committed"}))
        # watch() asks, the reader's thread assigns: the client blocks a call from another thread
        # while one polls
        self._asked: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inferlog-results-reader", daemon=True)
        self._thread.start()

    def watch(self, model: str | None, timeout: float = 30.0) -> None:
        """Read `model`'s outcomes (default: the settings' own model) from now on, if not yet:
        called before its first request is sent. InferlogError when its topics do not exist."""
        if self.s.model_outputs(model)[0] in self._watched:
            return
        done: Future = Future()
        self._asked.put((model, done))
        try:
            done.result(timeout)
        except FutureTimeout:
            raise InferlogError(f"the outcomes of model {model or self.s.served_name!r} could not be read "
                                f"within {timeout:g}s") from None

    def _watch(self, model: str | None) -> None:
        """On the reader's thread: assign `model`'s outputs from their ends."""
        results, dead = self.s.model_outputs(model)
        if results in self._watched:
            return
        tps = []
        for topic in (results, dead):
            md = self._consumer.list_topics(topic, timeout=10).topics[topic]
            if md.error is not None and md.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise UnknownModel(f"model {model or self.s.served_name!r} has no outcomes topic {topic!r}: "
                                   "no worker of it has run (a worker makes its model's topics)")
            if md.error is not None:
                raise InferlogError(f"topic {topic!r} of model {model or self.s.served_name!r}: {md.error}")
            for p in md.partitions:
                # explicit end offsets: an outcome of a request sent after this lies past them
                _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                tps.append(TopicPartition(topic, p, high))
        self._consumer.incremental_assign(tps)
        self._dead.add(dead)
        self._watched.add(results)

    def expect(self, request_id: str) -> Future:
        f: Future = Future()
        with self._lock:
            self._waiters[request_id] = f
        return f

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._waiters.pop(request_id, None)

    def _run(self) -> None:
        from .replies import outcome_of

        while not self._stop.is_set():
            while not self._asked.empty():
                model, done = self._asked.get()
                try:
                    self._watch(model)
                    done.set_result(None)
                except Exception as e:  # KafkaException, InferlogError: the caller's
                    done.set_exception(e)
            msgs = self._consumer.consume(500, 0.2)
            if not self._waiters:
                continue
            for m in msgs:
                if m.error() is not None:
                    continue
                failed = m.topic() in self._dead
                if not failed and (m.key() or b"").decode() not in self._waiters:
                    continue  # not ours: no decode
                o = outcome_of(failed, m.key(), m.value(), self.codec)
                if o is not None:
                    with self._lock:
                        f = self._waiters.pop(o.request_id, None)
                    if f is not None:
                        f.set_result(o)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()

"""The commit: outputs and consumed offsets leave the worker together, in fixed steps.

Exactly-once (default), one Kafka transaction per commit:
  1. begin the transaction
  2. produce every result and dead letter
  3. send the consumed offsets with the consumer group's metadata (fences zombies, KIP-447)
  4. commit the transaction (this flushes; delivery errors surface here)
At-least-once: 1. produce, 2. flush and confirm every delivery, 3. commit offsets
synchronously, checking each partition's error.

A failed commit raises CommitAborted (nothing of it is visible to read_committed readers:
the worker rewinds to its last commit and redoes the work) or FatalError (fenced: this
worker must stop; its successor owns the partitions now).
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from inferlog.clients import confluent_config
from inferlog.errors import FatalError

from .stages import Out

log = logging.getLogger(__name__)

FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
          KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED}


class CommitAborted(Exception):
    """The commit did not happen; redo the work since the last commit."""


def _produce_all(producer: Producer, outputs: list[Out], on_delivery=None) -> None:
    for o in outputs:
        while True:
            try:
                producer.produce(o.topic, o.value, o.key, headers=o.headers or None, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let librdkafka send, then retry
                producer.poll(0.05)
    producer.poll(0)


def _offsets(commits: dict[tuple[str, int], int]) -> list[TopicPartition]:
    return [TopicPartition(t, p, off) for (t, p), off in commits.items()]


class TransactionalEmitter:
    def __init__(self, settings, consumer, timeout_s: float = 30.0):
        self.consumer = consumer
        self.timeout = timeout_s
        conf = confluent_config(settings, **{
            "transactional.id": f"inferlog-{settings.group_id}-{settings.worker_id}",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "transaction.timeout.ms": 60000,
            "partitioner": "murmur2_random",  # Java-compatible: audit finds a result's partition from its key
        })
        self.conf = conf
        self.producer = Producer(conf)
        self.producer.init_transactions(timeout_s)

    def commit(self, outputs: list[Out], commits: dict[tuple[str, int], int], group_metadata=None) -> None:
        """`group_metadata`: the consumer's, taken when the offsets were released (the caller
        may run this on another thread); read from the consumer when not given."""
        if not outputs and not commits:
            return
        try:
            self.producer.begin_transaction()
            _produce_all(self.producer, outputs)
            if commits:
                self._send_offsets(_offsets(commits), group_metadata or self.consumer.consumer_group_metadata())
            self._commit_with_retry()
        except KafkaException as e:
            self._handle(e)

    # the worker's split: deliver() on its emit thread, commit_offsets() back on its loop thread
    deliver = commit

    def commit_offsets(self, commits: dict[tuple[str, int], int]) -> None:
        """Nothing left to do: the offsets went in the transaction."""

    def _send_offsets(self, offsets, group_metadata) -> None:
        """send_offsets_to_transaction, bounded. librdkafka can block in it far past its timeout
        when the group coordinator went away mid-transaction (librdkafka #5456; seen here when
        the broker restarts): then the stuck producer is left to its thread and a new one with
        the same transactional.id takes over, whose init_transactions fences the old one and
        aborts its open transaction, so the worker rewinds and redoes the work."""
        box: list = []
        producer = self.producer

        def call():
            try:
                producer.send_offsets_to_transaction(offsets, group_metadata, self.timeout)
                box.append(None)
            except BaseException as e:  # handed to the loop thread below
                box.append(e)

        t = threading.Thread(target=call, name="inferlog-send-offsets", daemon=True)
        t.start()
        t.join(self.timeout + 5)
        if t.is_alive():
            log.error("send_offsets_to_transaction stuck for %.0fs: replacing the transactional producer",
                      self.timeout + 5)
            self._replace_producer()
            raise CommitAborted("send_offsets_to_transaction did not return; producer replaced")
        if box[0] is not None:
            raise box[0]

    def _replace_producer(self) -> None:
        self.producer = Producer(self.conf)
        try:
            self.producer.init_transactions(self.timeout)
        except KafkaException as e:
            raise FatalError(f"a new transactional producer could not start: {e}") from e

    def _commit_with_retry(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.producer.commit_transaction(self.timeout)
                return
            except KafkaException as e:
                err = e.args[0]
                if err.retriable() and not err.txn_requires_abort() and time.monotonic() < deadline:
                    continue
                raise

    def _handle(self, e: KafkaException):
        err: KafkaError = e.args[0]
        if err.fatal() or err.code() in FENCED:
            raise FatalError(f"transactional producer cannot go on: {err}") from e
        log.warning("transaction aborted: %s", err)
        self._abort()
        raise CommitAborted(str(err)) from e

    def _abort(self) -> None:
        """Abort to a clean state, retrying while the coordinator is merely unreachable."""
        deadline = time.monotonic() + 4 * self.timeout
        while True:
            try:
                self.producer.abort_transaction(self.timeout)
                return
            except KafkaException as e:
                err = e.args[0]
                if err.code() == KafkaError._STATE:  # no transaction in progress: already clean
                    return
                if not err.retriable() or time.monotonic() > deadline:
                    raise FatalError(f"abort failed: {err}") from e
                log.warning("abort_transaction: %s; retrying", err)

    def close(self) -> None:
        try:
            self.producer.flush(self.timeout)
        except KafkaException as e:  # a fenced (fatal) producer raises here; the exit code must stay 3
            log.warning("producer close: %s", e)


class AtLeastOnceEmitter:
    def __init__(self, settings, consumer, timeout_s: float = 30.0):
        self.consumer = consumer
        self.timeout = timeout_s
        self.producer = Producer(confluent_config(settings, **{
            "enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4",
            "partitioner": "murmur2_random"}))
        self._errors: list[KafkaError] = []

    def _on_delivery(self, err, msg):
        if err is not None:
            self._errors.append(err)

    def commit(self, outputs: list[Out], commits: dict[tuple[str, int], int], group_metadata=None) -> None:
        self.deliver(outputs, commits)
        self.commit_offsets(commits)

    def deliver(self, outputs: list[Out], commits=None, group_metadata=None) -> None:
        """Produce and wait until every output is acknowledged (any thread)."""
        try:
            _produce_all(self.producer, outputs, self._on_delivery)
        except KafkaException as e:  # refused locally (e.g. too large): redo from the last commit
            raise CommitAborted(f"produce failed: {e}") from e
        left = self.producer.flush(self.timeout)
        if left or self._errors:
            errs, self._errors = self._errors, []
            raise CommitAborted(f"{left} undelivered, errors: {errs[:3]}")

    def commit_offsets(self, commits: dict[tuple[str, int], int]) -> None:
        """Synchronous offset commit, on the thread that polls the consumer: from another
        thread librdkafka's synchronous commit was seen to block until the consumer closed."""
        if commits:
            try:
                done = self.consumer.commit(offsets=_offsets(commits), asynchronous=False)
            except KafkaException as e:
                raise CommitAborted(f"offset commit failed: {e}") from e
            bad = [tp for tp in done or () if tp.error is not None]
            if bad:
                raise CommitAborted(f"offset commit failed for {bad}")

    def close(self) -> None:
        self.producer.flush(self.timeout)


def make_emitter(settings, consumer):
    return (TransactionalEmitter if settings.delivery == "exactly-once" else AtLeastOnceEmitter)(settings, consumer)

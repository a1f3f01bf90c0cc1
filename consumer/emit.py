"""Emitters: one commit of outputs (and, exactly-once, their consumed offsets), in fixed steps.

Exactly-once (default), one Kafka transaction per commit:
  1. begin the transaction
  2. produce every result and dead letter
  3. send the consumed offsets with the consumer group's metadata (fences zombies, KIP-447)
  4. commit the transaction (this flushes; delivery errors surface here)
At-least-once: 1. produce, 2. flush and confirm every delivery; the offsets are committed
afterwards by the caller, from the thread that polls the consumer (consumer/committer.py).

An output the producer refuses for good (too large for the broker or the topic, an invalid
record) is replaced by a small dead letter saying why (`fallback`, the ResultBuilder's
`unwritable`) and the commit is tried again (a suspect alone first: the broker refuses whole
batches), so one record can never stop its partition.

A failed commit raises CommitAborted (nothing of it is visible to read_committed readers:
the worker rewinds to its last commit and redoes the work) or FatalError (fenced: this
worker must stop; its successor owns the partitions now).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from inferlog.clients import confluent_config
from inferlog.committed import PATIENCE_S
from inferlog.errors import FatalError, RestartRequired

from . import sweep
from .records import Out

log = logging.getLogger(__name__)

FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
          KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED}
# this message can never be written, however often it is retried
REFUSED = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_RECORD,
           KafkaError.RECORD_LIST_TOO_LARGE, KafkaError._INVALID_ARG}


class CommitAborted(Exception):
    """The commit did not happen; redo the work since the last commit."""


class Refusals:
    """Outputs the producer refused for good, and what to do about them.

    librdkafka refuses a record that is too large itself (at produce()); the broker refuses a
    whole record batch that exceeds a topic's max.message.bytes, batch-mates included. So a
    record refused within a batch is a suspect, produced alone next time; one refused alone
    (or by produce()) is replaced by its small dead letter (`fallback`)."""


    def __init__(self, outputs: list[Out], fallback):
        self.outputs, self.fallback = outputs, fallback
        self.alone: set[int] = set()  # produced alone (flushed before and after)
        self.refused: list[tuple[object, str]] = []  # (the message or the index, why) this attempt
        self.errors: list[KafkaError] = []  # any other delivery error this attempt

    def on_delivery(self, err, msg) -> None:  # one bound method for every message: no closure each
        if err is None:
            return
        if err.code() in REFUSED:
            self.refused.append((msg, f"{err.name()}: {err.str()}"))
        else:
            self.errors.append(err)

    def _index(self, msg) -> int | None:
        if isinstance(msg, int):
            return msg
        return next((i for i, o in enumerate(self.outputs)
                     if o.topic == msg.topic() and o.key == msg.key() and o.value == msg.value()), None)

    def settle(self) -> list[int]:
        """After an attempt with refusals: replace those refused alone, make the others
        suspects; returns the outputs to produce again. [] when nothing can be done (no
        fallback, an output without a source): the caller then fails as it would without this."""
        found = [(self._index(m), why) for m, why in self.refused]
        self.refused, self.errors = [], []
        if self.fallback is None or any(i is None or self.outputs[i].source is None for i, _ in found):
            return []
        for i, why in found:
            if i in self.alone:
                self.replace(i, why)  # refused alone: its own refusal
            else:
                self.alone.add(i)
        return sorted({i for i, _ in found})

    def replace(self, i: int, why: str) -> bool:
        """An output produce() refused itself (too large for the client): it is its own refusal,
        so its dead letter replaces it at once. Nothing else changes: delivery reports already
        recorded this attempt stay for the attempt's end (settling here cleared them, and an
        at-least-once commit then went on as if they had been delivered). False if it cannot be
        replaced (no fallback, no source)."""
        if self.fallback is None or self.outputs[i].source is None:
            return False
        log.warning("the output for %s[%d]@%d was refused (%s): written as a dead letter", *self.outputs[i].source, why)
        self.outputs[i] = self.fallback(self.outputs[i], f"the output could not be written: {why}")
        self.alone.discard(i)
        return True

    def tries_left(self, attempt: int) -> bool:
        """Batched, then the suspects alone, then with the replacements. In a transaction the
        first refusal ends an attempt, so each attempt after the first replaces one at least."""
        return attempt < 2 + len(self.outputs)


def _produce_all(producer: Producer, outputs: list[Out], refusals: Refusals | None = None,
                 timeout: float = 30.0, only: list[int] | None = None) -> None:
    cb = refusals.on_delivery if refusals is not None else None
    alone = refusals.alone if refusals is not None else ()
    for i in range(len(outputs)) if only is None else only:
        o = outputs[i]
        if i in alone:
            producer.flush(timeout)  # a batch of its own: a refusal is then its own
        while True:
            try:
                producer.produce(o.topic, o.value, o.key, headers=o.headers or None, on_delivery=cb)
                break
            except BufferError:  # local queue full: let librdkafka send, then retry
                producer.poll(0.05)
            except KafkaException as e:  # too large for this client: replaced at once, if it can be
                err = e.args[0]
                if refusals is None or err.code() not in REFUSED:
                    raise
                if not refusals.replace(i, f"{err.name()}: {err.str()}"):
                    raise
                o = outputs[i]
        if i in alone:
            producer.flush(timeout)
    producer.poll(0)


class BoundedCalls:
    """Calls run on one long-lived daemon thread, each waited for at most a given time: a call
    that does not return in time is left running there, and the caller is told (TimeoutError).
    Daemon, so a call stuck in a client never holds up the end of the process."""

    def __init__(self, name: str):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, fut = self.calls.get()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the caller
                    fut.set_exception(e)

    def run(self, fn, timeout: float):
        fut: Future = Future()
        self.calls.put((fn, fut))
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise TimeoutError from None


SWEEP_HEADER = "inferlog-sweep"  # key and header of the sweep's records: aborted, never read_committed
SWEEP_KEY = sweep.SWEEP_KEY


def _no_member(settings):
    """Group metadata of no member (generation -1): what the sweep's aborted offsets carry."""
    from confluent_kafka import Consumer

    c = Consumer(confluent_config(settings, **{"group.id": settings.worker_group}))
    try:
        return c.consumer_group_metadata()
    finally:
        c.close()


def offsets_of(commits: dict[tuple[str, int], int]) -> list[TopicPartition]:
    return [TopicPartition(t, p, off) for (t, p), off in commits.items()]


class TransactionalEmitter:
    transactional = True  # the offsets go in the transaction

    def __init__(self, settings, consumer, timeout_s: float | None = None, fallback=None, sweep_also: tuple = (),
                 outputs: tuple[str, str] | None = None):
        self.consumer = consumer
        self.broker_lost = threading.Event()
        # each call bounded well inside the transaction's own timeout: a commit that cannot end
        # in time aborts and is redone, before the coordinator aborts it under us
        self.timeout = timeout_s if timeout_s is not None else settings.transaction_timeout_ms / 3000
        self.fallback = fallback  # (Out, why) -> a small dead letter for an output that cannot be written
        conf = confluent_config(settings, **{
            "transactional.id": f"inferlog-{settings.worker_group}-{settings.worker_id}",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "transaction.timeout.ms": settings.transaction_timeout_ms,
            "partitioner": "murmur2_random",  # Java-compatible: audit finds a result's partition from its key
            # librdkafka's error callback: a broker connection lost (or every broker down) means
            # a transaction may have ended while its markers could not be written: sweep first.
            # An Event, not a method of self: a producer holding its emitter made a reference
            # cycle, freed by the garbage collector at any moment on any thread (a fresh clone's
            # suite died of a segmentation fault once it was there)
            "error_cb": lambda err, lost=self.broker_lost: lost.set(),
        })
        self.conf = conf
        self.stuck = False  # a call never returned: nothing more is asked of this producer
        self.bounded = BoundedCalls("inferlog-send-offsets")
        self.commits = 0
        self.restarts = settings.restarts
        # fault injection (tests): this commit's send_offsets hangs, in the first process only
        self.stuck_at = settings.fault_stuck_commit if settings.restarts == 0 else 0
        self.producer = Producer(conf)
        self._init_transactions()
        # what a sweep covers; unsure: a transaction of this id may hang (at start: its last
        # one, which init_transactions just aborted; later: one ending while a broker was away)
        # `outputs`: what it writes, (results, dead letters): the model's own, or a replay's
        results, deadletters = outputs or settings.model_outputs()
        self.sweep_topics = (results, deadletters, *sweep_also)
        # the sweep's offset, only so that AddOffsetsToTxn puts the group's offsets partition in:
        # on a topic the group never reads (its own results), never on a request partition, whose
        # owner commits it meanwhile (a request partition here coincided with a storm's duplicates)
        self.anchor = TopicPartition(results, 0, 0)
        self.settings = settings
        self.codec = None  # made when a sweep finds open records to decode
        self.open_ends: dict = {}
        self.unsure = True
        self._sweep()

    def _sweep(self, member=None, tries: int = 3) -> bool:
        """Settle what a transaction of this id left hanging (consumer/sweep.py): read this
        worker's open records, abort one empty transaction over every partition it writes to
        and the group's offsets, then produce again those records whose requests the group
        counts as done and nothing visible answers. At start, and before the first transaction
        after librdkafka reported a lost broker. False when the broker did not let it finish
        (it is asked again before the next commit)."""
        self.unsure = False  # an error from here on asks for another sweep
        try:
            candidates = self._open_records()
        except KafkaException as e:
            err = e.args[0]
            if err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED):
                log.error("sweep skipped: this worker may not read %s (%s); a transaction Kafka leaves hanging "
                          "stays until it can (README, \"A hanging transaction is swept\")",
                          " and ".join(self.sweep_topics), err)
                return True
            self.unsure = True
            log.warning("sweep: cannot read this worker's open records: %s", err)
            return False
        for attempt in range(1, tries + 1):
            try:
                parts = []
                for t in self.sweep_topics:  # topics that do not exist (yet) hold nothing of ours
                    md = self.producer.list_topics(t, timeout=self.timeout).topics.get(t)
                    if md is not None and not md.error:
                        parts += [(t, p) for p in md.partitions]
                self.producer.begin_transaction()
                for t, p in parts:  # a key: a compacted topic refuses a record without one
                    self.producer.produce(t, key=SWEEP_KEY, value=b"", partition=p, headers=[(SWEEP_HEADER, b"1")])
                if self.producer.flush(self.timeout):
                    raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "sweep records not delivered"))
                if member is None:
                    member = (self.consumer.consumer_group_metadata() if self.consumer is not None
                              else _no_member(self.settings))
                self._sweep_offsets(self.anchor, member)
                self.producer.abort_transaction(self.timeout)
                break
            except KafkaException as e:
                self.unsure = True
                err = e.args[0]
                if err.code() in FENCED or err.fatal():
                    raise FatalError(f"transactional producer cannot go on: {err}") from e
                log.warning("sweeping this id's transactions (try %d of %d): %s", attempt, tries, err)
                try:
                    self.producer.abort_transaction(self.timeout)
                except KafkaException:
                    pass
        else:
            return False
        if candidates:
            self._restore(candidates)
        return not self.unsure

    def _open_records(self) -> list:
        ranges = sweep.open_ranges(self.settings, self.sweep_topics, self.timeout)
        if not ranges.ends:
            return []
        self.open_ends = ranges.ends
        found = sweep.read_range(self.settings, "read_uncommitted", ranges.ends, timeout=30)
        return sweep.ours(found, self._codec(), self.settings.worker_id)

    def _codec(self):
        if self.codec is None:
            from inferlog.codec import Codec

            self.codec = Codec.from_settings(self.settings)
        return self.codec

    def _restore(self, candidates: list) -> None:
        """Step 3 of the sweep: the records it aborted whose requests are nevertheless done."""
        from inferlog.committed import group_reader, last_committed

        sources = sorted({c.source[:2] for c in candidates})
        reader = group_reader(self.settings, self.settings.worker_group)
        try:
            done = {(tp.topic, tp.partition): tp.offset
                    for tp in last_committed(reader, [TopicPartition(t, p) for t, p in sources], patience=60)}
        finally:
            reader.close()
        # what read_committed readers see from where the open records began, once the last
        # stable offset is past them (another worker's open transaction holds it back a while)
        spans = {tp: (lo, max(c.offset for c in candidates if (c.topic, c.partition) == tp) + 1)
                 for tp, (lo, _) in self.open_ends.items()
                 if any((c.topic, c.partition) == tp for c in candidates)}
        spans = sweep.settled(self.settings, spans, timeout=2 * self.timeout * 3 + 15)
        visible = sweep.read_range(self.settings, "read_committed", spans, timeout=30)
        again = sweep.to_restore([c for c in candidates if (c.topic, c.partition) in spans], visible, done,
                                 self._codec())
        if again:
            self.producer.begin_transaction()
            for c in again:
                self.producer.produce(c.topic, key=c.key, value=c.value, headers=c.headers, partition=c.partition)
            self._commit_with_retry()
        log.warning("swept %d records of this worker left open past the last stable offset: %d produced again "
                    "(their requests are done and nothing else answers them), the rest stay aborted (answered "
                    "elsewhere, or not done and redone)", len(candidates), len(again))

    def _sweep_offsets(self, anchor, member) -> None:
        """AddOffsetsToTxn puts the group's offsets partition in the sweep (its abort marker
        clears offsets left pending); the offsets themselves may be refused, no matter. Bounded
        as every send_offsets is (librdkafka#5456)."""
        producer = self.producer
        try:
            self.bounded.run(lambda: producer.send_offsets_to_transaction([anchor], member, self.timeout),
                             self.timeout + 5)
        except TimeoutError:
            self.stuck = True
            raise RestartRequired("send_offsets_to_transaction did not return in a sweep "
                                  "(librdkafka#5456): the process starts again") from None
        except KafkaException as e:
            if e.args[0].fatal() or e.args[0].code() in FENCED:
                raise
            log.debug("sweep: offsets refused (%s); aborting all the same", e.args[0])

    def commit(self, outputs: list[Out], commits: dict[tuple[str, int], int], group_metadata=None) -> None:
        """`group_metadata`: the consumer's, taken when the offsets were released (the caller
        may run this on another thread); read from the consumer when not given."""
        if not outputs and not commits:
            return
        self.producer.poll(0)  # serves the error callback: a broker lost since the last commit
        if self.broker_lost.is_set():
            self.broker_lost.clear()
            self.unsure = True
        if self.unsure and not self._sweep(group_metadata):
            raise CommitAborted("a transaction of this id may hang and the sweep failed: this commit waits")
        refusals = Refusals(outputs, self.fallback)
        attempt = 0
        while True:
            attempt += 1
            try:
                self.producer.begin_transaction()
                _produce_all(self.producer, outputs, refusals, self.timeout)
                if commits:
                    self._send_offsets(offsets_of(commits), group_metadata or self.consumer.consumer_group_metadata())
                self._commit_with_retry()
                return
            except KafkaException as e:
                # a refused record puts the transaction in error at once, but its delivery report
                # waits to be served: serve it before deciding, else a refusal looked like any
                # abort and the same batch was refused again on the redo
                try:
                    self.producer.poll(0)
                except KafkaException:  # a fatal producer raises its error again here: e says it
                    pass
                err = e.args[0]
                again = (refusals.refused and refusals.tries_left(attempt) and not err.fatal()
                         and err.code() not in FENCED)
                if again:
                    self._abort()  # nothing of it is visible: the same outputs and offsets go again
                    # librdkafka's sequence numbers do not survive a refused record (the next
                    # transaction failed with OUT_OF_ORDER_SEQUENCE_NUMBER here): a new producer,
                    # a new epoch
                    self._replace_producer()
                    if refusals.settle():
                        continue
                self._handle(e)

    def _send_offsets(self, offsets, group_metadata) -> None:
        """send_offsets_to_transaction, bounded. librdkafka can block in it far past its timeout
        when the group coordinator went away mid-transaction (librdkafka#5456, #5511; seen here
        when the broker restarts), and the request it holds may still go out later.

        A stuck producer is never replaced in the process: a new one with the same
        transactional.id has the same producer id, and the old one's late TxnOffsetCommit (or a
        late produce) would then be taken into the new one's next transaction - offsets of
        aborted answers committed (records lost), or an aborted answer committed twice. Issue 24
        saw both after such a replacement. So the process starts again (RestartRequired): its end
        ends every request of the stuck client, and init_transactions at the start aborts the
        open transaction; the partitions are redone from the committed offsets."""
        self.commits += 1
        hang = self.commits == self.stuck_at
        producer = self.producer

        def call():
            if hang:
                threading.Event().wait()  # the injected fault: stuck until the process ends
            producer.send_offsets_to_transaction(offsets, group_metadata, self.timeout)

        try:
            self.bounded.run(call, self.timeout + 5)
        except TimeoutError:
            self.stuck = True
            raise RestartRequired(f"send_offsets_to_transaction did not return in {self.timeout + 5:.0f}s "
                                  "(librdkafka#5456): the process starts again to end that producer") from None

    def _init_transactions(self, patience: float = 180.0) -> None:
        """Fences any earlier producer of this transactional.id and aborts what it left open;
        asked again while the coordinator is away or loading (a worker restarted while its
        broker restarts too), then a clear error."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self.producer.init_transactions(self.timeout)
                return
            except KafkaException as e:
                err = e.args[0]
                if not err.retriable() or time.monotonic() > deadline:
                    raise FatalError(f"the transactional producer could not start: {err}") from e
                log.warning("init_transactions: %s; retrying", err)

    def _replace_producer(self) -> None:
        """Only after a completed abort (a refused record broke librdkafka's sequence numbers):
        the old producer has nothing in flight, so nothing of it can reach the new one's epoch."""
        self.producer = Producer(self.conf)
        self._init_transactions()

    def _commit_with_retry(self, patience: float = PATIENCE_S) -> None:
        """commit_transaction until it gives an answer. A call that timed out is resumed by
        calling it again (librdkafka: "retry call to resume"); an abort is refused meanwhile
        (_CONFLICT: a commit is in progress), so giving up on it there left the worker spinning
        on abort_transaction until it stopped. The coordinator itself ends a transaction older
        than transaction.timeout.ms, so an answer comes; past `patience` (a client that never
        answers) the process starts again, which aborts the transaction at its start."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self.producer.commit_transaction(self.timeout)
                return
            except KafkaException as e:
                err = e.args[0]
                if not err.retriable() or err.txn_requires_abort():
                    raise
                if time.monotonic() > deadline:
                    self.stuck = True
                    raise RestartRequired(f"commit_transaction gave no answer in {patience:.0f}s: {err}") from e
                log.warning("commit_transaction: %s; resuming it", err)

    def _handle(self, e: KafkaException):
        err: KafkaError = e.args[0]
        if err.code() in FENCED:  # another producer owns this transactional.id now: stop
            raise FatalError(f"transactional producer cannot go on: {err}") from e
        if err.fatal():
            self._unusable(err, e)
        log.warning("transaction aborted: %s", err)
        self._abort()
        raise CommitAborted(str(err)) from e

    def _unusable(self, err: KafkaError, cause: BaseException):
        """A fatal producer error that is not a fencing (INVALID_TXN_STATE when the coordinator
        lost track of a transaction around a broker restart, say) leaves its transaction open,
        and a read_committed reader of its output topics waits behind it. The process starts
        again under its own id (RestartRequired), whose init_transactions aborts that transaction;
        only a fenced producer, whose id someone else holds, stops for good."""
        self.stuck = True  # flushing a fatal producer only fails
        if self.restarts >= 3:  # two processes under one id would fence each other in turn: stop
            raise FatalError(f"transactional producer cannot go on: {err} (after {self.restarts} restarts)") from cause
        raise RestartRequired(f"transactional producer failed ({err}): the process starts again") from cause

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
                if err.code() in FENCED:
                    raise FatalError(f"abort failed: {err}") from e
                if not err.retriable() or time.monotonic() > deadline:
                    self._unusable(err, e)
                log.warning("abort_transaction: %s; retrying", err)
                time.sleep(0.5)  # a coordinator away answers nothing sooner

    def close(self) -> None:
        if self.stuck:  # flushing would wait on the stuck call; the process ends (or restarts)
            return
        try:
            self.producer.flush(self.timeout)
        except Exception as e:  # a fenced (fatal) producer raises here (KafkaException, or a SystemError
            log.warning("producer close: %s", e)  # from the client itself); the exit code must stay 3


class AtLeastOnceEmitter:
    transactional = False  # the caller commits the offsets once commit() returned

    def __init__(self, settings, timeout_s: float = 30.0, fallback=None):
        self.timeout = timeout_s
        self.fallback = fallback
        self.producer = Producer(confluent_config(settings, **{
            "enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4",
            "partitioner": "murmur2_random"}))

    def commit(self, outputs: list[Out], commits=None, group_metadata=None) -> None:
        """Produce and wait until every output is acknowledged (any thread). Outputs refused
        for good are replaced by their dead letters (at-least-once: the rest may repeat). The
        offsets are not committed here: the caller commits them once this returned, from the
        thread that polls the consumer (consumer/committer.py; `transactional` is False)."""
        refusals = Refusals(outputs, self.fallback)
        only = None  # everything, then only what was refused
        attempt = 0
        while True:
            attempt += 1
            try:
                _produce_all(self.producer, outputs, refusals, self.timeout, only)
            except KafkaException as e:  # refused locally for another reason: redo from the last commit
                raise CommitAborted(f"produce failed: {e}") from e
            left = self.producer.flush(self.timeout)
            if left or refusals.errors:
                raise CommitAborted(f"{left} undelivered, errors: {refusals.errors[:3]}")
            if not refusals.refused:
                return
            why = [w for _, w in refusals.refused[:3]]
            only = refusals.settle() if refusals.tries_left(attempt) else []
            if not only:
                raise CommitAborted(f"outputs refused: {why}")

    def close(self) -> None:
        self.producer.flush(self.timeout)


def make_emitter(settings, consumer, fallback=None):
    """The emitter of settings.delivery; only a transaction sends offsets, so only it takes the consumer."""
    if settings.delivery == "exactly-once":
        return TransactionalEmitter(settings, consumer, fallback=fallback)
    return AtLeastOnceEmitter(settings, fallback=fallback)

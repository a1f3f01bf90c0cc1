"""Helpers for tests that run workers against the real broker and read the real topics."""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from inferlog.clients import confluent_config, retry
from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list


@dataclass(frozen=True)
class Fetched:
    """A fetched record as the drivers' parts see it (confluent_kafka.Message's accessors), for
    tests without one; `eof`: a partition's end-of-file event at that offset instead."""

    t: str
    p: int
    o: int
    eof: bool = False

    def topic(self) -> str:
        return self.t

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o

    def error(self) -> KafkaError | None:
        return KafkaError(KafkaError._PARTITION_EOF) if self.eof else None


def read_all(settings, topic: str, timeout: float = 30.0, isolation: str = "read_committed") -> list[Record]:
    """Every committed record of `topic` up to its current end (read_committed; or every
    record, aborted ones too, with isolation="read_uncommitted")."""
    c = Consumer(confluent_config(settings, **{"group.id": f"reader-{time.time_ns()}",
                                               "isolation.level": isolation, "enable.auto.commit": False}))
    try:
        # Right after a topic is made (or while the broker catches up) its metadata and offsets
        # may not be there yet: Kafka's "not yet" errors are retried, not failures.
        parts = retry(lambda: _partitions(c, topic), f"metadata of {topic}")
        ends, tps = {}, []
        for p in parts:
            low, high = retry(lambda p=p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10),
                              f"offsets of {topic}[{p}]")
            if high > low:
                ends[p] = high
                tps.append(TopicPartition(topic, p, low))
        c.assign(tps)
        out, deadline = [], time.monotonic() + timeout
        position = {p: -1 for p in ends}
        # with read_committed the end may be a transaction marker: stop when positions reach it;
        # `timeout` counts from the last record read, so a slow broker that delivers is waited for
        while any(c.position([TopicPartition(topic, p)])[0].offset < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: positions {position} short of {ends}")
            for m in c.consume(1000, 0.2):
                if m.error() is None:
                    out.append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or []))
                    position[m.partition()] = m.offset()
                    deadline = time.monotonic() + timeout
        return out
    finally:
        c.close()


def _partitions(c: Consumer, topic: str) -> list[int]:
    """The topic's partitions once each has a leader; KafkaException (retriable) until then."""
    md = c.list_topics(topic, timeout=10).topics[topic]
    if md.error is not None:
        raise KafkaException(md.error)
    if not md.partitions or any(p.leader < 0 for p in md.partitions.values()):
        raise KafkaException(KafkaError(KafkaError.LEADER_NOT_AVAILABLE, f"{topic} has partitions without a leader"))
    return list(md.partitions)


def produce_raw(settings, values: list[tuple[bytes | None, bytes | None]], topic: str | None = None) -> None:
    p = Producer(confluent_config(settings, **{"enable.idempotence": True, "acks": "all"}))
    for key, value in values:
        p.produce(topic or settings.tier_topic("normal"), value, key)
    assert p.flush(30) == 0


@dataclass
class Accounting:
    """Where every request offset ended: results and dead letters by source position."""

    requests: list[Record]
    results: list[dict]
    dead_letters: list[dict]

    @property
    def by_source(self) -> dict[tuple[str, int, int], list[tuple[str, dict]]]:
        """Outputs by the (topic, partition, offset) of the request they answer."""
        seen = defaultdict(list)
        for kind, recs in (("result", self.results), ("dead", self.dead_letters)):
            for r in recs:
                src = r["source"]
                seen[(src["topic"], src["partition"], src["offset"])].append((kind, r))
        return seen

    @property
    def missing(self) -> set[tuple[str, int, int]]:
        """Request positions with no output (yet)."""
        return {(r.topic, r.partition, r.offset) for r in self.requests} - set(self.by_source)

    def assert_exactly_once(self) -> None:
        """Every request offset (both tiers) has exactly one output, and no output points elsewhere."""
        by = self.by_source
        positions = {(r.topic, r.partition, r.offset) for r in self.requests}
        missing = positions - set(by)
        extra = set(by) - positions
        dupes = {k: len(v) for k, v in by.items() if len(v) > 1}
        assert not missing, f"{len(missing)} requests lost, e.g. {sorted(missing)[:5]}"
        assert not extra, f"outputs for offsets never produced: {sorted(extra)[:5]}"
        assert not dupes, f"{len(dupes)} requests answered more than once, e.g. {list(dupes.items())[:5]}"

    def reasons(self) -> Counter:
        return Counter(d["reason"] for d in self.dead_letters)


def account(settings, codec: Codec | None = None, models: list[str] | None = None) -> Accounting:
    """The requests of the settings' model (or of each of `models`, both tiers) and every output
    on its (their) results and dead-letter topics."""
    codec = codec or Codec.from_settings(settings)
    outputs = [settings.model_outputs(m) for m in (models or [None])]
    return Accounting(
        [r for m in (models or [None]) for t in settings.model_topics(m) for r in read_all(settings, t)],
        [codec.decode(r.value, expect=RESULT) for res, _ in outputs for r in read_all(settings, res)],
        [codec.decode(r.value, expect=DEADLETTER) for _, dead in outputs for r in read_all(settings, dead)],
    )


def wait_until(pred, timeout: float = 60.0, every: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def output_count(settings) -> int:
    """Committed results + dead letters, from the end offsets (cheap; counts markers too)."""
    return len(read_all(settings, settings.model_results_topic)) + len(read_all(settings, settings.model_deadletter_topic))


@contextlib.contextmanager
def running_worker(settings, runner, **kw):
    """A Worker on a thread: ready (assigned) on entry, stopped and drained on exit. Its model's
    topics (requests of both tiers, results, dead letters) are made first, as `inferlog worker` makes them."""
    from inferlog.consumer.worker import Worker
    from inferlog.topics import ensure_topics

    ensure_topics(settings, [*settings.request_topics, *settings.model_outputs()])
    w = Worker(settings, runner, **kw)
    code: list[int] = []
    t = threading.Thread(target=lambda: code.append(w.run()), daemon=True)
    t.start()
    try:
        if not w.ready.wait(90):
            raise TimeoutError("worker got no partitions")
        yield w
    finally:
        w.stop()
        t.join(120)
        assert not t.is_alive(), "worker did not stop"
    assert code == [0], f"worker exit code {code}"


def decode_request(codec, rec: Record) -> dict:
    return codec.decode(rec.value, expect=REQUEST)


def cli_env(settings) -> dict[str, str]:
    """The connection settings as INFERLOG_* variables, as an operator would set them."""
    env = {}
    for name in ("bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_username", "ssl_cafile",
                 "ssl_certfile", "ssl_keyfile"):
        value = getattr(settings, name)
        if value is not None:
            env[f"INFERLOG_{name.upper()}"] = str(value)
    if settings.sasl_password is not None:
        env["INFERLOG_SASL_PASSWORD"] = settings.sasl_password.get_secret_value()
    return env


class Stream:
    """A steady stream on both tiers (every 4th request high priority) from a thread."""

    def __init__(self, settings, rate: float = 25.0):
        self.s, self.every = settings, 1.0 / rate
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from inferlog.producer.sync import Producer as Submitter

        with Submitter(self.s) as p:
            while not self.stop.is_set():
                p.submit("embed", f"steady request {self.sent}", priority=5 if self.sent % 4 == 3 else 0)
                self.sent += 1
                time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def limit_results_topic(settings, max_bytes: int) -> None:
    """The results topic refuses records over `max_bytes` (max.message.bytes), as a cluster's
    topic may: outputs too large for it must become their small dead letters."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

    res = ConfigResource(ConfigResource.Type.TOPIC, settings.model_results_topic,
                         incremental_configs=[ConfigEntry("max.message.bytes", str(max_bytes),
                                                          incremental_operation=AlterConfigOpType.SET)])
    admin = AdminClient(confluent_config(settings))  # held until the futures are done
    for f in admin.incremental_alter_configs([res]).values():
        f.result(30)


@contextlib.contextmanager
def announced(settings, name: str | None = None, task: str = "embed"):
    """A worker's registry record for model `name` (default: the settings' own) on its topics,
    with no worker behind it: what the publishers check a request's model against."""
    from inferlog.registry import Announcer, Member

    name = name or settings.served_name
    now = int(time.time() * 1000)
    a = Announcer(settings, Member(
        name=name, worker_id=f"{settings.worker_id}-announced", task=task, revision=None, digest=None, limits={},
        chat_template=None, model=settings.model, topics=list(settings.model_topics(name)),
        group=settings.worker_group, host="test", started_at=now, heartbeat_at=now, announce_interval_s=30.0)).start()
    try:
        yield a
    finally:
        a.stop()

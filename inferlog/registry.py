"""Which models are served, and by whom: the model registry, on a compacted Kafka topic.

Every live worker keeps one record on `models_topic`, keyed "<model name>/<worker id>", its
value a JSON announcement (`Member`): the served name, the task, what identifies the weights
(`revision` and `digest`: the same provenance its results carry, from consumer/models.py
`identity`), its limits, the chat template of its tokenizer, where its files are, the topics
and group it reads, who and where it is, when it started and when it last said so. A worker's
`Announcer` publishes it when the worker starts serving, again every `announce_interval_s`
(the heartbeat), and a tombstone when it stops cleanly. A killed worker sends no tombstone: its
record expires once its heartbeat is older than EXPIRY_INTERVALS of its own intervals.

A reader's `ModelDirectory` (the gateway's, the SDKs', `inferlog produce`'s; later audit's)
reads the topic from the beginning, answers "ready" once it has read to the end, then tails it. It
answers the live models: each name with its members whose heartbeat is fresh; a model is live
while at least one member is. The directory is a thread with a confluent-kafka consumer and a
lock around a small dict, so any caller, sync or asyncio, asks it without I/O (`Registry` is
the pure part: records in, live models out, for a given clock).

The topic is compacted (the latest record per worker is kept, a tombstone removes it) and also
deletes old segments (a day, rolled hourly): compaction alone would keep the last record of
every worker ever killed, which each reader would read again at start-up. A live worker's
record is never older than its interval, so retention never removes one.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import ConfigError, UnknownModel, UnsupportedTask

log = logging.getLogger(__name__)

FORMAT = 1  # of the announcement's JSON; a reader skips records of a format it does not know
EXPIRY_INTERVALS = 3  # a member whose heartbeat is older than 3 of its intervals is gone
TOPIC_CONFIG = {"cleanup.policy": "compact,delete", "retention.ms": str(86_400_000),
                "segment.ms": str(3_600_000)}
OWNER = "inferlog"  # OpenAI's `owned_by` of every model listed
TASKS = ("embed", "generate", "classify")
LOOK_AGAIN_S = 2.0  # how often a directory without its topic looks for it again
Routes = Callable[[str], Iterable[str]]  # a model name -> the topics its requests are published to


def member_key(name: str, worker_id: str) -> str:
    return f"{name}/{worker_id}"


@dataclass(frozen=True)
class Member:
    """One worker's announcement of the model it serves (the record's JSON value)."""

    name: str  # the served name (settings.model_name, else the runner's info.name)
    worker_id: str
    task: str  # embed | generate | classify
    revision: str | None  # the hub commit of the files, when they came from the hub cache
    digest: str | None  # sha256 (first 16 hex) over the weight files' contents, as results carry
    limits: dict[str, int]
    chat_template: str | dict | None  # the tokenizer's, None without one
    model: str  # where its tokenizer and model files are (settings.model); requests may name it too
    topics: list[str]  # the request topics it reads, high tier first
    group: str
    host: str
    started_at: int  # epoch ms
    heartbeat_at: int  # epoch ms of this record
    announce_interval_s: float
    device: str = ""
    format: int = FORMAT

    @property
    def key(self) -> str:
        return member_key(self.name, self.worker_id)

    @property
    def expires_at(self) -> int:
        return self.heartbeat_at + int(EXPIRY_INTERVALS * self.announce_interval_s * 1000)

    def fresh(self, now_ms: int) -> bool:
        return now_ms < self.expires_at

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Member":
        """ValueError for anything that is not an announcement this reader understands."""
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not an announcement of format {FORMAT}")
        known = {f for f in cls.__dataclass_fields__}
        try:
            m = cls(**{k: v for k, v in d.items() if k in known})  # later formats may add fields
        except TypeError as e:
            raise ValueError(str(e)) from None
        if not isinstance(m.name, str) or not m.name or m.task not in TASKS \
                or not all(isinstance(t, int) for t in (m.started_at, m.heartbeat_at)) \
                or not isinstance(m.announce_interval_s, (int, float)) or m.announce_interval_s <= 0:
            raise ValueError("an announcement without a name, a known task, its times or an interval")
        return m


@dataclass(frozen=True)
class LiveModel:
    """A served model: its name and its live members (oldest first)."""

    name: str
    members: tuple[Member, ...] = field(default=())

    @property
    def newest(self) -> Member:
        return self.members[-1]

    @property
    def task(self) -> str:
        """What the model does, by its newest member (all agree unless misconfigured)."""
        return self.newest.task

    @property
    def tasks(self) -> set[str]:
        return {m.task for m in self.members}

    @property
    def created(self) -> int:
        """Epoch seconds since it has been served without a break (its oldest live member's start)."""
        return min(m.started_at for m in self.members) // 1000

    def openai(self) -> dict[str, Any]:
        """OpenAI's model object, with what inferlog adds: its task and how many workers serve it."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": OWNER,
                "task": self.task, "members": len(self.members)}


class Registry:
    """The latest announcement per key, and the live models at a given time (pure, no I/O)."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.skipped = 0  # records that were no announcement

    def apply(self, key: str | bytes | None, value: bytes | None) -> None:
        """One record of the topic, in order: an announcement replaces its key's, a tombstone removes it."""
        key = key.decode(errors="replace") if isinstance(key, bytes) else key
        if value is None:
            self.members.pop(key or "", None)
            return
        try:
            m = Member.from_json(value)
        except ValueError as e:
            self.skipped += 1
            log.warning("model registry: skipped the record of key %r: %s", key, e)
            return
        self.members[key or m.key] = m

    def live(self, now_ms: int, routes: Routes | None = None) -> dict[str, LiveModel]:
        """{name: LiveModel} of the models with at least one fresh member, by name; with `routes`
        (a model name -> the topics its requests are published to), only members that read a
        topic their own name's requests reach count."""
        by: dict[str, list[Member]] = {}
        for m in self.members.values():
            if m.fresh(now_ms) and (routes is None or _reaches(routes, m.name, m)):
                by.setdefault(m.name, []).append(m)
        return {name: LiveModel(name, tuple(sorted(ms, key=lambda m: (m.started_at, m.worker_id))))
                for name, ms in sorted(by.items())}

    def find(self, name: str, now_ms: int, routes: Routes | None = None) -> LiveModel | None:
        """The live model a request naming `name` reaches: by its served name, else by the
        files of its members (settings.model), which the worker answers to as well, where a
        request naming them reaches the member (the shared layout's one topic pair)."""
        live = self.live(now_ms, routes)
        if name in live:
            return live[name]
        return next((lm for lm in live.values()
                     if any(m.model == name and (routes is None or _reaches(routes, name, m)) for m in lm.members)),
                    None)

    def check(self, name: str, task: str | None, now_ms: int, routes: Routes | None = None) -> LiveModel:
        """The live model named `name` that does `task` (any task when None or not a task at all:
        request validation says so later). UnknownModel or UnsupportedTask otherwise, with the
        reason a worker's dead letter would carry."""
        lm = self.find(name, now_ms, routes)
        if lm is None:
            served = ", ".join(sorted(self.live(now_ms, routes))) or "none"
            raise UnknownModel(f"model {name!r} is not served by any worker (served: {served})")
        task = (task or "").lower()
        if task in TASKS and task not in lm.tasks:
            raise UnsupportedTask(f"model {lm.name!r} serves {'/'.join(sorted(lm.tasks))}, not {task}")
        return lm


# -- the worker's side -------------------------------------------------------------------------
def announcement(settings, runner, *, started_at: int | None = None) -> Member:
    """What a worker serving `runner` under `settings` announces (its heartbeat_at: now)."""
    info = runner.info
    tokenizer = getattr(runner, "hf_tokenizer", None)
    now = _now_ms()
    limits = {"max_inputs": settings.max_inputs, "max_input_bytes": settings.max_input_bytes,
              "max_input_tokens": min(settings.max_input_tokens, runner.max_input_tokens),
              "max_batch_size": settings.max_batch_size, "max_batch_tokens": settings.max_batch_tokens}
    if runner.task == "GENERATE":
        limits |= {"max_new_tokens_limit": settings.max_new_tokens_limit,
                   "default_max_new_tokens": settings.default_max_new_tokens}
    return Member(name=settings.model_name or info.name, worker_id=settings.worker_id, task=runner.task.lower(),
                  revision=info.revision, digest=info.digest, limits=limits,
                  chat_template=getattr(tokenizer, "chat_template", None) or None, model=settings.model,
                  topics=list(settings.request_topics), group=settings.worker_group, host=socket.gethostname(),
                  started_at=started_at or now, heartbeat_at=now, announce_interval_s=settings.announce_interval_s,
                  device=str(getattr(runner, "device", "")))


class Announcer:
    """Keeps a worker's record on the models topic: at start, every interval from a daemon
    thread, a tombstone at a clean stop. Plain idempotent producer, outside the worker's
    transactions: a heartbeat must not wait for a commit, nor be aborted with one. A delivery
    that fails is logged (once per kind of error) and the next heartbeat tries again; the worker
    serves on whatever happens here."""

    def __init__(self, settings, member: Member, *, clock: Callable[[], int] | None = None, producer=None):
        from confluent_kafka import Producer

        from .clients import confluent_config

        self.s, self.member = settings, member
        self.topic = settings.models_topic
        self.interval = settings.announce_interval_s
        self.clock = clock or _now_ms
        # a heartbeat that cannot be delivered before it would expire is worth nothing
        timeout_ms = max(5000, int(EXPIRY_INTERVALS * self.interval * 1000))
        self.producer = producer or Producer(confluent_config(settings, **{
            "client.id": f"inferlog-announce-{member.worker_id}", "enable.idempotence": True, "acks": "all",
            "linger.ms": 0, "message.timeout.ms": timeout_ms}))
        self.delivered = 0
        self._last_error: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_runner(cls, settings, runner) -> "Announcer":
        return cls(settings, announcement(settings, runner))

    @property
    def key(self) -> bytes:
        return self.member.key.encode()

    def start(self, timeout: float = 5.0) -> "Announcer":
        """The first record, waited for (at most `timeout`: a reader that starts next sees the
        model; a cluster that takes longer gets it from the heartbeat thread), then that thread."""
        self.beat()
        if self.producer.flush(timeout) and self._last_error is None:
            self._report(f"not delivered within {timeout:g}s")
        self._thread = threading.Thread(target=self._run, name="inferlog-announce", daemon=True)
        self._thread.start()
        log.info("announcing model %s (%s) on %s as %s every %gs", self.member.name, self.member.task, self.topic,
                 self.member.key, self.interval)
        return self

    def beat(self) -> None:
        """One announcement, with heartbeat_at now."""
        self.member = replace(self.member, heartbeat_at=self.clock())
        self._produce(self.member.to_json())

    def stop(self, tombstone: bool = True, timeout: float = 5.0) -> None:
        """Stop the heartbeat; with `tombstone` (a clean stop) remove the record at once. Without
        it (a fatal stop: another process may already announce under this worker id, a fenced
        zombie's successor) the record is left to expire."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if tombstone and self.delivered:
            self._produce(None)
            if self.producer.flush(timeout):
                log.warning("model registry: the tombstone of %s was not delivered within %gs; the record "
                            "expires in %gs", self.member.key, timeout, EXPIRY_INTERVALS * self.interval)
            else:
                log.info("model %s: withdrawn %s from %s", self.member.name, self.member.key, self.topic)
        self.producer.purge()  # nothing left behind to retry in a closing process
        self.producer.flush(0)  # serves the purged records' reports

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - a heartbeat never stops the worker
                self._report(str(e))

    def _produce(self, value: bytes | None) -> None:
        try:
            self.producer.produce(self.topic, value, self.key, on_delivery=self._delivered)
        except BufferError:  # heartbeats piling up behind an unreachable cluster: skip this one
            self._report("the producer's queue is full")
        self.producer.poll(0)

    def _delivered(self, err, _msg) -> None:
        if err is not None and self._stopping.is_set():
            return  # what stop() purged, or gave up on and said so
        if err is None:
            if self._last_error is not None:
                log.info("model registry: %s announced again on %s", self.member.key, self.topic)
            self.delivered += 1
            self._last_error = None
        else:
            self._report(err.str() if hasattr(err, "str") else str(err))

    def _report(self, error: str) -> None:
        if error != self._last_error:
            log.warning("model registry: cannot announce %s on %s: %s (trying again every %gs)",
                        self.member.key, self.topic, error, self.interval)
        self._last_error = error


# -- the readers' side ---------------------------------------------------------------------------
class ModelDirectory:
    """The live models, from the models topic: read from the beginning, then tailed, on a daemon
    thread of its own. `ready` once every partition has been read to its end (the end as it was
    when the reader got there: librdkafka's partition EOF; the records are not transactional, so
    no marker hides an end). Until then it knows nothing, and says so (`ready` False, `error`):
    a cluster it cannot reach, or a topic not created yet (a deployment whose topics predate the
    registry), is looked at again every few seconds. `settled` once it is ready or its first look
    failed, so that a caller waits for the answer, not for a cluster that is not there.

    Sync and thread-safe: live(), find() and check() read a dict under a lock, without I/O, so
    the gateway's event loop calls them directly. With `routes` it answers only the members that
    a publisher's request reaches: those reading the topics the publisher sends their model's
    requests to (a shared-layout worker is no answer to a per-model publisher, nor the reverse)."""

    def __init__(self, settings, *, clock: Callable[[], int] | None = None, routes: Routes | None = None):
        self.s = settings
        self.topic = settings.models_topic
        self.clock = clock or _now_ms
        self.routes = routes
        self.registry = Registry()
        self.read = 0  # records read
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._settled = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # the last error the reader met, for logs and probes

    # -- answers (any thread) --------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Ready, or the first look at the topic failed (then `error` says why); False: neither in time."""
        self._settled.wait(timeout)
        return self.ready

    def apply(self, key, value) -> None:
        with self._lock:
            self.registry.apply(key, value)
            self.read += 1

    def live(self) -> dict[str, LiveModel]:
        with self._lock:
            return self.registry.live(self.clock(), self.routes)

    def find(self, name: str) -> LiveModel | None:
        with self._lock:
            return self.registry.find(name, self.clock(), self.routes)

    def check(self, name: str, task: str | None = None) -> LiveModel:
        with self._lock:
            return self.registry.check(name, task, self.clock(), self.routes)

    # -- the reader thread -------------------------------------------------------------------------
    def start(self) -> "ModelDirectory":
        self._thread = threading.Thread(target=self._run, name="inferlog-models", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _consumer(self):
        from confluent_kafka import Consumer

        from .clients import confluent_config

        # assigned, never subscribed: no member of any group, nothing committed (the group id is
        # librdkafka's requirement; ACLs grant the prefix)
        return Consumer(confluent_config(self.s, **{
            "group.id": f"inferlog-models-{uuid.uuid4().hex[:12]}", "enable.auto.commit": False,
            "enable.partition.eof": True, "auto.offset.reset": "earliest",
            "client.id": "inferlog-models", "fetch.wait.max.ms": 500}))

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

        consumer = self._consumer()
        unread: set[int] | None = None  # partitions not yet read to their end; None: not assigned
        looked = float("-inf")
        try:
            while not self._stopping.is_set():
                if unread is None:
                    if time.monotonic() - looked < LOOK_AGAIN_S:
                        self._stopping.wait(0.2)
                        continue
                    looked = time.monotonic()
                    try:
                        md = consumer.list_topics(self.topic, timeout=2).topics.get(self.topic)
                    except KafkaException as e:
                        self._met(f"cannot read the metadata of {self.topic}: {e.args[0].str()}")
                        continue
                    if md is None or md.error is not None or not md.partitions:
                        why = md.error.str() if md is not None and md.error is not None else "no such topic"
                        self._met(f"cannot read topic {self.topic} ({why}): `inferlog kafka topics` creates it")
                        continue
                    parts = sorted(md.partitions)
                    consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
                    unread = set(parts)
                    self.error = None
                for m in consumer.consume(500, 0.2):
                    err = m.error()
                    if err is None:
                        self.apply(m.key(), m.value())
                    elif err.code() == KafkaError._PARTITION_EOF:
                        unread.discard(m.partition())
                        if not unread and not self._ready.is_set():
                            log.info("model registry: read %d records of %s; live: %s", self.read, self.topic,
                                     ", ".join(self.live()) or "none")
                            self._ready.set()
                            self._settled.set()
                    else:
                        self._met(f"reading {self.topic}: {err.str()}")
        except Exception as e:  # noqa: BLE001 - logged; the directory then answers what it had
            log.exception("model registry reader stopped: %s", e)
            self.error = str(e)
            self._settled.set()
        finally:
            consumer.close()

    def _met(self, error: str) -> None:
        if error != self.error:
            log.warning("model registry: %s", error)
        self.error = error
        self._settled.set()


def request_directory(settings, **kw) -> ModelDirectory:
    """The directory a publisher checks its requests against: the members its requests reach,
    routed by model (Settings.model_topics)."""
    return ModelDirectory(settings, routes=settings.model_topics, **kw)


def _reaches(routes: Routes, name: str, m: Member) -> bool:
    """Whether a request naming `name`, published where `routes` says, reaches member `m`."""
    try:
        return not set(routes(name)).isdisjoint(m.topics)
    except ConfigError:  # a name no topic can carry
        return False


def refuse_unserved(directory: ModelDirectory, model: str | None, task: str | None) -> None:
    """The publishers' check (the gateway's, the SDKs', `inferlog produce`'s): UnknownModel or
    UnsupportedTask when the directory knows better than to publish a request naming `model` for
    `task`. A request naming no model is not checked (any worker's model answers it); nor is any
    while the directory has not read the topic to its end (a cluster not reached yet, a topic not
    created yet): the request goes on as before the registry, and a worker dead-letters it if it
    is not theirs."""
    if model is not None and directory.ready:
        directory.check(model, task)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000

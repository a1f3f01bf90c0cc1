"""Request-reply over Kafka: read the results and dead-letter topics of every model and hand
each outcome to whoever waits for its request_id.

Every reader (each gateway replica, each SDK client) assigns itself ALL partitions of each
model's two output topics, positioned at their ends when it starts reading them, and joins no
group: any replica sees every outcome, so any replica can answer any id. Outcomes are kept raw (bytes) in a bounded
LRU/TTL cache and decoded only when someone asks. An id older than the cache is found by a
targeted lookup: results are keyed by request_id and partitioned with murmur2, so the key
names the one partition to read, and the id's creation time says where in it to start.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.codec import has_lz4
from aiokafka.partitioner import murmur2

from inferlog.clients import aiokafka_kwargs
from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec
from inferlog.errors import ConfigError, DecodeError, InferlogError
from inferlog.settings import Settings

log = logging.getLogger(__name__)

CLOCK_SKEW_MS = 5000  # between the host that made an id and the broker's timestamps


class RequestFailed(InferlogError):
    """The request ended as a dead letter; `reason` is its stable code (INVALID_REQUEST, ...)."""

    def __init__(self, request_id: str, reason: str, detail: str):
        super().__init__(f"request {request_id} failed: {reason}: {detail}")
        self.request_id, self.reason, self.detail = request_id, reason, detail


class TopicMissing(InferlogError):
    """A topic to read does not exist (a model's outputs: no worker of it ever started)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    request_id: str
    failed: bool  # a dead letter, not a result
    value: bytes

    def decode(self, codec: Codec) -> dict:
        return codec.decode(self.value, expect=DEADLETTER if self.failed else RESULT)

    def result(self, codec: Codec) -> dict:
        """The result record, or RequestFailed for a dead letter."""
        rec = self.decode(codec)
        if self.failed:
            raise RequestFailed(self.request_id, rec["reason"], rec["detail"])
        return rec


def outcome_of(failed: bool, key: bytes | None, value: bytes | None, codec: Codec) -> Outcome | None:
    """The outcome a record of the results (failed=False) or dead-letter topic holds, or None."""
    if not value:
        return None
    if not failed:
        return Outcome(key.decode(), False, value) if key else None
    # a dead letter is keyed by the request's own key, which need not be its id, and some
    # (refused before validation finished) carry no request_id: read it from the original
    # request they hold (dead letters are rare, decoding them is fine)
    try:
        d = codec.decode(value, expect=DEADLETTER)
        rid = d["request_id"] or (d["value"] and codec.decode(d["value"], expect=REQUEST)["request_id"])
    except DecodeError:
        rid = None
    return Outcome(rid, True, value) if rid else None


def result_partition(request_id: str, partitions: int) -> int:
    """Where a result keyed by request_id lives (Java's murmur2 partitioner; the worker's too)."""
    return (murmur2(request_id.encode()) & 0x7FFFFFFF) % partitions


async def partition_counts(settings: Settings, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings), client_id="inferlog-replies-admin")
    await admin.start()
    try:
        described = {d["topic"]: d for d in await admin.describe_topics(topics)}
    finally:
        await admin.close()
    counts = {}
    for t in topics:
        d = described.get(t)
        if d is None or d["error_code"] or not d["partitions"]:
            raise TopicMissing(f"topic {t!r} does not exist on {settings.bootstrap_servers}")
        counts[t] = len(d["partitions"])
    return counts


async def topic_names(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings), client_id="inferlog-replies-admin")
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


class OutcomeCache:
    """Recent outcomes by request_id: at most `size`, none older than `ttl` seconds."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.size, self.ttl, self.clock = size, ttl, clock
        self._items: OrderedDict[str, tuple[float, float, Outcome]] = OrderedDict()  # (clock, wall, outcome)
        self.evicted_at = 0.0  # wall time (s) of the newest arrival evicted: older ids may be missing

    def put(self, o: Outcome) -> None:
        self._items[o.request_id] = (self.clock(), time.time(), o)
        self._items.move_to_end(o.request_id)
        while len(self._items) > self.size:
            self._forget(self._items.popitem(last=False)[1])

    def get(self, request_id: str) -> Outcome | None:
        item = self._items.get(request_id)
        if item is None:
            return None
        if self.clock() - item[0] > self.ttl:
            self._forget(self._items.pop(request_id))
            return None
        return item[2]

    def _forget(self, item) -> None:
        # the horizon moves to when the forgotten outcome ARRIVED, not to now: ids of requests
        # made after that can only be missing if they are still pending
        self.evicted_at = max(self.evicted_at, item[1])

    def __len__(self) -> int:
        return len(self._items)


class Replies:
    """The asyncio reader: `await start()`, `await watch(model)` before publishing a model's
    first request, then `expect(id)` / `get(id)` / `lookup(id, since_ms)`.

    Each model writes its outcomes to its own results and dead-letter topics
    (Settings.model_outputs): one reader (a consumer, assigned all their partitions from their
    ends) per model, started for every model whose topics exist at start and for each model
    watched later. `on_outcome(request_id)` is called for every outcome read (the gateway's
    in-flight quota)."""

    def __init__(self, settings: Settings, codec: Codec | None = None, *, cache_size: int | None = None,
                 cache_ttl: float | None = None, on_outcome: Callable[[str], None] | None = None):
        self.s = settings
        self.codec = codec or Codec.from_settings(settings)
        self.cache = OutcomeCache(cache_size or settings.gateway_cache_size, cache_ttl or settings.gateway_cache_ttl_s)
        self.on_outcome = on_outcome
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._readers: dict[str, tuple[AIOKafkaConsumer, asyncio.Task]] = {}  # by results topic
        self._watch_lock = asyncio.Lock()
        self._lookup: AIOKafkaConsumer | None = None
        self._lookup_lock = asyncio.Lock()
        self._started = False
        self.partitions: dict[str, int] = {}  # of every topic read
        self.dead_letter_topics: set[str] = set()
        self.started_at = 0.0  # wall time (s) the newest reader started: later outcomes of every watched model are read
        self.read = 0

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(**aiokafka_kwargs(self.s), group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed", client_id="inferlog-replies")

    async def start(self) -> None:
        """Read the outcomes of every model whose topics exist now (the shared pair of an old
        deployment too), from their ends."""
        if not has_lz4():  # workers compress results with lz4; without it every fetch fails
            raise ConfigError("reading results needs aiokafka's lz4 support: pip install cramjam")
        self._started = True
        async with self._watch_lock:
            for results, dead in await self._existing_pairs():
                await self._add(results, dead)
        self.started_at = self.started_at or time.time()
        log.info("reading outcomes of %d model(s): %s", len(self._readers), ", ".join(self._readers) or "none yet")

    async def watch(self, model: str | None) -> None:
        """Read `model`'s outcomes (default: the settings' own model) from now on, if not yet:
        awaited before its first request is published, so its outcome cannot be missed.
        TopicMissing when its topics do not exist (no worker of it ever started)."""
        results, dead = self.s.model_outputs(model)
        if results in self._readers:
            return
        async with self._watch_lock:
            if results not in self._readers:
                await self._add(results, dead)
                log.info("reading outcomes of model %s from %s and %s", model or self.s.served_name, results, dead)

    async def _existing_pairs(self) -> list[tuple[str, str | None]]:
        names = await topic_names(self.s)
        pairs = []
        for t in sorted(names):
            if self.s.is_output_topic(t, "results"):
                dead = self.s.deadletter_topic + t[len(self.s.results_topic):]
                pairs.append((t, dead if dead in names else None))
        return pairs

    async def _add(self, results: str, dead: str | None) -> None:
        topics = [results] + ([dead] if dead else [])
        counts = await partition_counts(self.s, topics)
        c = self._new_consumer()
        await c.start()
        try:
            tps = [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]
            started = time.time()
            c.assign(tps)
            # explicit end offsets, not a lazy seek_to_end: an outcome of a request sent after
            # this returns lies at or past them, so it cannot be skipped
            for tp, end in (await c.end_offsets(tps)).items():
                c.seek(tp, end)
        except BaseException:
            await c.stop()
            raise
        self.partitions.update(counts)
        if dead:
            self.dead_letter_topics.add(dead)
        self.started_at = max(self.started_at, started)
        self._readers[results] = (c, asyncio.create_task(self._run(c), name=f"inferlog-replies-{results}"))

    async def stop(self) -> None:
        readers, self._readers = list(self._readers.values()), {}
        for _, task in readers:
            task.cancel()
        await asyncio.gather(*(t for _, t in readers), return_exceptions=True)
        for c in [c for c, _ in readers] + [self._lookup]:
            if c is not None:
                await c.stop()
        self._lookup = None
        self._started = False
        for futs in self._waiters.values():
            for f in futs:
                f.cancel()

    async def __aenter__(self) -> "Replies":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._started and not any(task.done() for _, task in self._readers.values())

    async def _run(self, c: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await c.getmany(timeout_ms=1000, max_records=2000)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the client retries broker trouble itself; keep serving
                log.warning("results reader: %s", e)
                await asyncio.sleep(1)
                continue
            for tp, records in batches.items():
                failed = tp.topic in self.dead_letter_topics
                for r in records:
                    o = outcome_of(failed, r.key, r.value, self.codec)
                    if o is not None:
                        self._deliver(o)

    def _deliver(self, o: Outcome) -> None:
        self.read += 1
        self.cache.put(o)
        for f in self._waiters.pop(o.request_id, ()):
            if not f.done():
                f.set_result(o)
        if self.on_outcome is not None:
            self.on_outcome(o.request_id)

    # -- asking ------------------------------------------------------------------------------
    def get(self, request_id: str) -> Outcome | None:
        return self.cache.get(request_id)

    def expect(self, request_id: str) -> asyncio.Future:
        """A future for the outcome; register it BEFORE sending the request (and after
        watch(model)), so it cannot be missed."""
        f = asyncio.get_running_loop().create_future()
        if (o := self.cache.get(request_id)) is not None:
            f.set_result(o)
        else:
            self._waiters.setdefault(request_id, []).append(f)
        return f

    def forget(self, request_id: str, f: asyncio.Future) -> None:
        """Drop a waiter that gave up (timeout, cancelled request)."""
        futs = self._waiters.get(request_id)
        if futs and f in futs:
            futs.remove(f)
            if not futs:
                del self._waiters[request_id]

    async def wait(self, request_id: str, timeout: float, f: asyncio.Future | None = None) -> Outcome | None:
        """The outcome, or None after `timeout` seconds."""
        f = f or self.expect(request_id)
        try:
            return await asyncio.wait_for(asyncio.shield(f), timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            self.forget(request_id, f)

    def may_have_missed(self, created_ms: int) -> bool:
        """Could the outcome of a request created at `created_ms` be missing from the cache
        though written? (Written before the newest reader started, or since evicted.)"""
        horizon = max(self.started_at, self.cache.evicted_at) * 1000
        return created_ms < horizon + CLOCK_SKEW_MS

    async def lookup(self, request_id: str, since_ms: int) -> Outcome | None:
        """Scan the one partition the id hashes to of every model's results and dead-letter
        topics, from `since_ms` to the current end, for an outcome keyed by `request_id`.
        Bounded by gateway_lookup_max_records; one lookup at a time per reader."""
        async with self._lookup_lock:
            if self._lookup is None:
                self._lookup = self._new_consumer()
                await self._lookup.start()
            return await self._scan(self._lookup, request_id.encode(), since_ms - CLOCK_SKEW_MS)

    async def _scan(self, c: AIOKafkaConsumer, key: bytes, since_ms: int) -> Outcome | None:
        names = await topic_names(self.s)  # every model's, those not read yet too
        dead = {t for t in names if self.s.is_output_topic(t, "deadletter")}
        topics = sorted(dead | {t for t in names if self.s.is_output_topic(t, "results")})
        if not topics:
            return None
        counts = await partition_counts(self.s, topics)
        tps = [TopicPartition(t, result_partition(key.decode(), n)) for t, n in counts.items()]
        c.assign(tps)
        starts = await c.offsets_for_times({tp: max(0, since_ms) for tp in tps})
        ends = await c.end_offsets(tps)
        todo = {}
        for tp in tps:
            if starts[tp] is not None and starts[tp].offset < ends[tp]:
                c.seek(tp, starts[tp].offset)
                todo[tp] = ends[tp]
        found, scanned = None, 0
        deadline = time.monotonic() + 10
        while todo and scanned < self.s.gateway_lookup_max_records and time.monotonic() < deadline:
            batches = await c.getmany(*todo, timeout_ms=200, max_records=5000)
            for tp, records in batches.items():
                scanned += len(records)
                for r in records:
                    if r.key == key and r.offset < todo.get(tp, -1):
                        found = outcome_of(tp.topic in dead, r.key, r.value, self.codec) or found
                        if found is not None:  # one outcome per request: stop at the first
                            todo.clear()
                            break
            for tp in list(todo):
                if await c.position(tp) >= todo[tp]:
                    del todo[tp]
        if found is not None:
            self.cache.put(found)
        return found

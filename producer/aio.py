"""The asyncio producer SDK (aiokafka): same validation, keys and headers as the sync one.

Encoding a request is pure CPU work of microseconds, so it runs on the loop; sending only
appends to aiokafka's batch accumulator and waits (never blocks) when that is full.
infer() waits for the answer through producer/replies.py, started by the first call.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Iterable, Mapping, Sequence, Unpack

from aiokafka import AIOKafkaProducer
from aiokafka.codec import has_lz4

from inferlog.clients import aiokafka_kwargs
from inferlog.errors import InferlogError, UnknownModel
from inferlog.request import spelled_out
from inferlog.settings import Settings

from .replies import Replies, TopicMissing
from .sync import (SUBMIT_DEFAULTS, DeliveryLedger, Envelope, ModelCheck, ProduceError, RequestEncoder, SubmitOptions,
                   check_many, split_settings)

log = logging.getLogger(__name__)


class AsyncProducer:
    """`async with AsyncProducer(settings) as p: rid = await p.submit("embed", ["text"])`.

    A failed delivery is raised as ProduceError by the next submit() or flush(). A request
    naming a model nobody serves raises UnknownModel / UnsupportedTask, nothing sent, as with
    the sync Producer (`check_models=False` turns that off).
    """

    def __init__(self, settings: Settings | None = None, *, check_models: bool = True, **overrides: Any):
        self.settings, client = split_settings(settings, overrides)
        self._encoder = RequestEncoder(self.settings)
        self.models = ModelCheck(self.settings, check_models)
        self._replies: Replies | None = None
        self._replies_lock = asyncio.Lock()
        self.ledger = DeliveryLedger()
        self._pending: set[asyncio.Future] = set()
        self._kwargs = {
            **aiokafka_kwargs(self.settings),
            "enable_idempotence": True,
            "acks": "all",
            "linger_ms": 5,
            # aiokafka compresses on the event loop; without cramjam only gzip is there,
            # which costs more loop time than it saves on small requests.
            "compression_type": "lz4" if has_lz4() else None,
            "client_id": "inferlog-producer",
            **client,
        }
        self._producer: AIOKafkaProducer | None = None

    @property
    def codec(self):
        return self._encoder.codec

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        self.models = ModelCheck(self.settings, self.models.enabled)  # a producer stopped and started again
        if self.settings.framing == "confluent":
            # The first encode registers the schema over HTTP: do it off the loop, once.
            with ThreadPoolExecutor(1, thread_name_prefix="inferlog-registry") as pool:
                await asyncio.get_running_loop().run_in_executor(pool, self._encoder.envelope, "embed", "warm-up")
        # Created here: aiokafka binds to the running loop.
        self._producer = AIOKafkaProducer(**self._kwargs)
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()
            self._producer = None
            raise

    async def stop(self) -> None:
        if self._producer is None:
            return
        producer, self._producer = self._producer, None
        await asyncio.to_thread(self.models.stop)
        try:
            await producer.flush()
            await self._settle()
        finally:
            await producer.stop()
            if self._replies is not None:
                await self._replies.stop()
                self._replies = None
        self.ledger.raise_failures()

    async def __aenter__(self) -> "AsyncProducer":
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            await self.stop()
        except InferlogError:
            if exc_type is None:
                raise
            log.exception("stopping the producer while handling another error")

    @spelled_out(SubmitOptions, SUBMIT_DEFAULTS)
    async def submit(self, task: str, inputs: str | Sequence[str], *, acked: bool = False,
                     **options: Unpack[SubmitOptions]) -> str:
        """Validate, encode and enqueue one request; returns its request_id (see Producer.submit).

        acked=True waits for the broker's ack of this record and raises ProduceError for it
        alone, here (the gateway: one caller's failure is not another's)."""
        self._check()
        env = self._encoder.envelope(task, inputs, **options)
        await self._check_model(task, options.get("model"))
        if acked:
            await self._send_acked(env)
        else:
            await self._send(env)
        return env.request_id

    @spelled_out(SubmitOptions, SUBMIT_DEFAULTS)
    async def infer(self, task: str, inputs: str | Sequence[str], *, timeout: float = 30,
                    **options: Unpack[SubmitOptions]) -> dict:
        """Submit one request and wait for its result record (see Producer.infer): RequestFailed
        for a dead letter, TimeoutError when nothing comes within `timeout` seconds."""
        self._check()
        env = self._encoder.envelope(task, inputs, **options)
        await self._check_model(task, options.get("model"))
        replies = await self.replies()
        try:
            await replies.watch(options.get("model"))  # the model's own outputs, read from now on
        except TopicMissing as e:
            raise UnknownModel(f"model {options.get('model') or self.settings.served_name!r}: {e}; no worker "
                               "of it has run (a worker makes its model's topics)") from None
        fut = replies.expect(env.request_id)  # before sending: the outcome cannot be missed
        try:
            await self._send_acked(env)
            outcome = await replies.wait(env.request_id, max(0.0, timeout), fut)
        finally:
            replies.forget(env.request_id, fut)
        if outcome is None:
            raise TimeoutError(f"no result for request {env.request_id} within {timeout}s")
        return outcome.result(self._encoder.codec)

    async def replies(self) -> Replies:
        """The results reader infer() uses, started on first use."""
        async with self._replies_lock:
            if self._replies is None:
                r = Replies(self.settings, self._encoder.codec, cache_size=256)
                await r.start()
                self._replies = r
            return self._replies

    async def _send_acked(self, env: Envelope) -> None:
        fut = await self._producer.send(env.topic, env.value, env.key, headers=env.headers)
        try:
            await fut
        except Exception as e:
            raise ProduceError(f"{env.request_id}: {type(e).__name__}: {e}", type(e).__name__,
                               [(env.request_id, type(e).__name__, str(e))]) from e

    async def submit_many(self, requests: Iterable[Mapping[str, Any]]) -> list[str]:
        """All requests are validated before any is sent: one bad request raises, nothing is sent."""
        self._check()
        requests = list(requests)
        envs = self._encoder.envelopes(requests)
        if any(self.models.needs_start(r.get("model")) for r in requests):
            await asyncio.to_thread(self.models.start)
        check_many(self.models, requests)
        for env in envs:
            await self._send(env)
        return [e.request_id for e in envs]

    async def flush(self) -> None:
        """Wait until every record is delivered; raise ProduceError for any that failed."""
        self._check(failures=False)
        await self._producer.flush()
        await self._settle()
        self.ledger.raise_failures()

    async def _send(self, env: Envelope) -> None:
        fut = await self._producer.send(env.topic, env.value, env.key, headers=env.headers)
        self._pending.add(fut)
        fut.add_done_callback(partial(self._on_delivery, env.request_id))

    async def _settle(self) -> None:
        # Our done-callbacks were registered before asyncio.wait's own, so they have run
        # by the time it returns.
        if self._pending:
            await asyncio.wait(list(self._pending))

    def _on_delivery(self, request_id: str, fut: asyncio.Future) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            self.ledger.fail(request_id, "CANCELLED", "the send was cancelled")
        elif (e := fut.exception()) is not None:
            self.ledger.fail(request_id, type(e).__name__, str(e))
        else:
            self.ledger.ok()

    async def _check_model(self, task: str, model: str | None) -> None:
        if self.models.needs_start(model):  # the first request naming a model: off the loop, it waits
            await asyncio.to_thread(self.models.start)
        self.models(task, model)

    def _check(self, failures: bool = True) -> None:
        if self._producer is None:
            raise InferlogError("producer is not started (use `async with` or await start())")
        if failures:
            self.ledger.raise_failures()

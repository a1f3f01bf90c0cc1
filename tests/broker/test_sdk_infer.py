"""The SDKs' infer(): request-reply over Kafka against the real broker and a real worker, and
their priority routing (a request at or above the threshold goes to the high tier's topic)."""
from __future__ import annotations

import asyncio

import pytest

from inferlog.consumer.runners import load_runner
from inferlog.errors import UnknownModel
from inferlog.producer.aio import AsyncProducer
from inferlog.producer.replies import RequestFailed, result_partition
from inferlog.producer.sync import Producer
from inferlog.topics import partition_counts
from inferlog.settings import default_model_path
from support import read_all, running_worker
from test_gateway import fresh_settings


@pytest.fixture(scope="module")
def stack(kafka):
    s = fresh_settings(kafka.bootstrap, max_wait_ms=5)
    with running_worker(s, load_runner(default_model_path(), device="cpu")):
        yield s


def check(res: dict, s, tier: str, n: int = 1) -> None:
    assert res["status"] == "OK" and len(res["outputs"]) == n and len(res["outputs"][0]["vector"]) == 384
    assert res["source"]["topic"] == (s.tier_topic("high") if tier == "high" else s.tier_topic("normal"))


def test_sync_infer_returns_results_and_raises_on_dead_letters(stack):
    s = stack
    with Producer(s) as p:
        check(p.infer("embed", ["one", "two"], timeout=60), s, "normal", 2)
        check(p.infer("embed", "urgent", priority=s.high_priority, timeout=60), s, "high")
        with pytest.raises(UnknownModel) as e:  # the SDK's own check: nobody announces it, nothing is sent
            p.infer("embed", "x", model="no-such-model", key="my-affinity-key", timeout=60)
        assert e.value.reason == "UNKNOWN_MODEL" and "no-such-model" in e.value.detail
    # unchecked: infer() reads that model's outcomes topics before it sends, and nobody made them
    with pytest.raises(UnknownModel) as e, Producer(s, check_models=False) as p:
        p.infer("embed", "x", model="no-such-model", key="my-affinity-key", timeout=60)
    assert "no-such-model" in e.value.detail and "no worker of it has run" in e.value.detail
    assert partition_counts(s, [s.tier_topic("normal", "no-such-model")]) == {}  # nothing was published
    with Producer(s, check_models=False) as p:
        with pytest.raises(TimeoutError):
            p.infer("embed", "too quick to answer", timeout=0.01)


def test_async_infer_returns_results_and_raises_on_dead_letters(stack):
    s = stack

    async def main():
        async with AsyncProducer(s) as p:
            results = await asyncio.gather(*(p.infer("embed", f"text {i}", priority=i % 2, timeout=60)
                                             for i in range(6)))
            for i, res in enumerate(results):
                check(res, s, "high" if i % 2 >= s.high_priority else "normal")
            with pytest.raises(RequestFailed) as e:
                await p.infer("generate", "x", timeout=60)
            assert e.value.reason == "UNSUPPORTED_TASK"
            with pytest.raises(TimeoutError):
                await p.infer("embed", "too quick to answer", timeout=0.01)

    asyncio.run(main())


def test_results_lie_where_their_request_id_hashes(stack):
    # what the gateway's lookup relies on: the worker partitions results with Java's murmur2
    recs = read_all(stack, stack.model_results_topic)
    assert recs and all(r.partition == result_partition(r.key.decode(), stack.partitions) for r in recs)

"""Scale-out as users do it: workers join a group that is already serving a steady stream on
both tiers, one at a time, and one leaves. After each step every member holds a balanced
share of *each* request topic (the consumer group protocol's range assignor, KIP-848) and
answers requests of the normal tier; at the end every offset is answered exactly once. The
second member runs its stages inline (one thread) among threaded ones, as a group does while
that setting rolls out."""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

import pytest

from inferlog.codec import RESULT, Codec
from inferlog.consumer.runners import load_runner
from inferlog.consumer.worker import Worker
from inferlog.settings import default_model_path
from support import Stream, account, output_count, read_all, wait_until

# headers the worker copies on (trace context), at their worst, on valid requests of both tiers
HOSTILE_HEADERS = [[("traceparent", b"0" * 999_000)],
                   [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                    ("tracestate", b"k=v," * 249_000)],
                   [("traceparent", b"ff-garbage"), ("h" * 1000, b"v" * 500_000)]]


def send_hostile(s, tag: str) -> int:
    """Valid requests with the worst copied headers, on both tiers, into the running stream."""
    from confluent_kafka import Producer as KafkaProducer

    from inferlog.clients import confluent_config
    from inferlog.codec import REQUEST
    from inferlog.request import build_request

    codec = Codec.from_settings(s)
    p = KafkaProducer(confluent_config(s, **{"enable.idempotence": True, "acks": "all",
                                             "message.max.bytes": 1_100_000}))
    n = 0
    for topic in s.request_topics:
        for i, headers in enumerate(HOSTILE_HEADERS):
            p.produce(topic, codec.encode(REQUEST, build_request("embed", f"hostile {tag} {i}")), headers=headers)
            n += 1
    assert p.flush(60) == 0
    return n

PARTITIONS = 6


class Member:
    """One worker of the group, on its own thread, with its own runner."""

    def __init__(self, settings, name: str, stages: str = "threads"):
        self.id = f"{settings.worker_group}.{name}"
        self.worker = Worker(settings.with_overrides(worker_id=self.id, stages=stages),
                             load_runner(default_model_path(), device="cpu"))
        self.code: list[int] = []
        self.thread = threading.Thread(target=lambda: self.code.append(self.worker.run()), daemon=True)
        self.thread.start()

    def holds(self, topic: str) -> set[int]:
        return {p for t, p in self.worker.engine.partitions if t == topic}

    def leave(self) -> None:
        self.worker.stop()
        self.thread.join(120)
        assert not self.thread.is_alive() and self.code == [0], f"{self.id} exit {self.code}"


def balanced(s, members: list[Member]) -> bool:
    """Each member holds floor(P/N) or ceil(P/N) partitions of each request topic, and together
    all of them, each once."""
    n = len(members)
    for topic in s.request_topics:
        held = [m.holds(topic) for m in members]
        if sorted(p for h in held for p in h) != list(range(PARTITIONS)):
            return False
        if any(len(h) not in (PARTITIONS // n, -(-PARTITIONS // n)) for h in held):
            return False
    return True


def normal_answers(s, codec) -> Counter:
    """Results of the normal tier, by the worker id that answered them."""
    return Counter(r["worker_id"] for r in (codec.decode(x.value, expect=RESULT) for x in read_all(s, s.model_results_topic))
                   if r["source"]["topic"] == s.tier_topic("normal"))


@pytest.mark.timeout(600)
def test_workers_joining_a_serving_group_one_by_one_each_take_a_share_of_each_tier(broker_settings):
    s = broker_settings.with_overrides(max_batch_size=8, max_wait_ms=5)
    codec = Codec.from_settings(s)
    members: list[Member] = []
    hostile = 0
    try:
        with Stream(s) as stream:
            # w2 runs its stages inline, as in a rolling change of that setting: a group may mix them
            for step, (name, stages) in enumerate((("w1", "threads"), ("w2", "inline"), ("w3", "threads"))):
                members.append(Member(s, name, stages))
                hostile += send_hostile(s, name)  # while the newcomer joins
                wait_until(lambda: balanced(s, members), timeout=90, every=0.5,
                           what=f"a balanced share of both tiers with {len(members)} members: "
                                f"{[(m.id, sorted(m.holds(s.tier_topic('normal'))), sorted(m.holds(s.tier_topic('high')))) for m in members]}")
                before = normal_answers(s, codec)
                # every member answers the normal tier in this step (the defect: a newcomer took
                # all normal partitions and the older member answered none)
                wait_until(lambda: all(normal_answers(s, codec)[m.id] > before[m.id] for m in members), timeout=90,
                           every=0.5, what=f"every member answering the normal tier at step {step + 1}")
            gone = members.pop(0)
            gone.leave()
            wait_until(lambda: balanced(s, members), timeout=90, every=0.5, what="a balanced share after one left")
            before = normal_answers(s, codec)
            wait_until(lambda: all(normal_answers(s, codec)[m.id] > before[m.id] for m in members), timeout=90,
                       every=0.5, what="the remaining members answering the normal tier")
        wait_until(lambda: output_count(s) >= stream.sent + hostile, timeout=120, what="every request answered")
    finally:
        for m in members:
            with contextlib.suppress(AssertionError):
                m.leave()
    acc = account(s)
    acc.assert_exactly_once()
    assert len(acc.requests) == stream.sent + hostile and not acc.dead_letters
    assert all(r["status"] == "OK" for r in acc.results)  # the hostile headers were dropped, not fatal
    tiers = Counter(r.topic for r in acc.requests)
    assert tiers[s.tier_topic("high")] > 0 and tiers[s.tier_topic("normal")] > 0
    answered = Counter((r["worker_id"], r["source"]["topic"]) for r in acc.results)
    assert all(answered[(f"{s.worker_group}.w2", t)] > 0 for t in s.request_topics), answered  # inline, both tiers

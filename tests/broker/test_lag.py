"""The worker's lag gauge against the group's committed lag, read by an outsider, on both tiers."""
from __future__ import annotations

import threading

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from inferlog.clients import confluent_config
from inferlog.codec import REQUEST, Codec
from inferlog.consumer.runners import load_runner
from inferlog.request import build_request
from inferlog.settings import default_model_path
from support import produce_raw, running_worker, wait_until


class GatedRunner:
    """A runner whose device step waits for the test's permit: without one nothing finishes, so
    nothing commits and the group's lag holds still while the test compares it."""

    def __init__(self, inner):
        self.inner = inner
        self.permits = threading.Semaphore(0)
        self.ran = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def allow(self, batches: int) -> None:
        self.permits.release(batches)

    def run(self, prepared):
        self.permits.acquire()
        out = self.inner.run(prepared)
        self.ran += 1  # one device thread
        return out


@pytest.fixture(scope="module")
def runner():
    return load_runner(default_model_path(), device="cpu")


def outsider_lag(s, admin, reader) -> dict[tuple[str, int], int] | None:
    """Log end minus the group's committed offset (log start where none), read stable by a
    read_committed consumer of the group and the admin API: not the calls the worker makes."""
    tps = [TopicPartition(t, p) for t in s.request_topics for p in range(s.partitions)]
    try:
        group = reader.committed(tps, timeout=10)
    except KafkaException:  # e.g. a transaction's offsets not yet stable
        return None
    if any(tp.error for tp in group):
        return None
    done = {(tp.topic, tp.partition): tp.offset for tp in group if tp.offset >= 0}

    def offsets(spec):
        return {(tp.topic, tp.partition): f.result(30).offset
                for tp, f in admin.list_offsets({tp: spec for tp in tps}).items()}

    ends, starts = offsets(OffsetSpec.latest()), offsets(OffsetSpec.earliest())
    return {k: ends[k] - done.get(k, starts[k]) for k in ends}


def gauge(w, s) -> dict[tuple[str, int], float | None]:
    r = w.metrics.registry
    return {(t, p): r.get_sample_value("inferlog_consumer_lag", {"topic": t, "partition": str(p)})
            for t in s.request_topics for p in range(s.partitions)}


def agreed(w, s, admin, reader) -> dict | None:
    """The lag both sides see, once the worker's last sample matches what the group has committed."""
    theirs = outsider_lag(s, admin, reader)
    return theirs if theirs is not None and gauge(w, s) == theirs else None


def by_topic(lag: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for (t, _), v in lag.items():
        out[t] = out.get(t, 0) + v
    return out


def test_lag_is_log_end_minus_committed_on_both_tiers(broker_settings, runner):
    codec = Codec.from_settings(broker_settings)

    def wave(tag: str, n: int) -> None:
        for topic in broker_settings.request_topics:
            produce_raw(broker_settings, [(None, codec.encode(REQUEST, build_request("embed", f"{tag} {topic} {i}")))
                                          for i in range(n)], topic=topic)

    wave("first", 150)
    s = broker_settings.with_overrides(max_batch_size=4, max_in_flight=16)
    gated = GatedRunner(runner)
    admin = AdminClient(confluent_config(s))
    reader = Consumer(confluent_config(s, **{"group.id": s.worker_group, "isolation.level": "read_committed"}))
    outputs = [0]

    def committed(outs):  # on the worker's loop thread, after each commit
        outputs[0] += len(outs)

    with running_worker(s, gated, on_commit=committed) as w:
        try:
            # nothing finished, nothing committed: the lag is the whole log of each partition
            lag = wait_until(lambda: agreed(w, s, admin, reader), what="lag from the log start")
            assert by_topic(lag) == {t: 150 for t in s.request_topics}
            # both tiers paused by back-pressure: their partitions get no fetch responses, so the
            # log ends those carried would stand still; the gauge must follow the log anyway
            wait_until(lambda: all(w.paused.values()), what="both tiers paused")
            wave("second", 50)
            lag = wait_until(lambda: agreed(w, s, admin, reader), what="lag of paused partitions")
            assert by_topic(lag) == {t: 200 for t in s.request_topics}
            # ten batches (at most 40 requests) committed, a backlog left on both tiers
            gated.allow(10)
            wait_until(lambda: gated.ran == 10 and outputs[0] > 0, what="ten batches")
            done = outputs[0]
            lag = wait_until(lambda: agreed(w, s, admin, reader), what="lag from committed offsets")
            assert all(n >= 160 for n in by_topic(lag).values()), lag
            assert sum(lag.values()) <= 400 - done, (lag, done)
            # drained: nothing owed on any partition
            gated.allow(1000)
            wait_until(lambda: agreed(w, s, admin, reader) == dict.fromkeys(lag, 0), timeout=240, what="lag 0 everywhere")
            assert outputs[0] == 400
        finally:
            gated.allow(1000)
            reader.close()
    # leaving the group gave every partition up: no series is left behind, under either label
    assert all(v is None for v in gauge(w, s).values())

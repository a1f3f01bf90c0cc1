"""The sweep's rule for what it produces again (consumer/sweep.py `ours`, `to_restore`), on
encoded results: a record of this worker that the aborted sweep left invisible is produced again
only when the group counts its request as done and no visible record answers it. The sweep on a
broker: tests/broker/test_sweep.py; on data dirs Kafka left hanging: tests/chaos/test_hanging.py."""
from __future__ import annotations

from inferlog.codec import RESULT, Codec
from inferlog.consumer.sweep import SWEEP_KEY, ours, to_restore

CODEC = Codec()
REQ = "inferlog.requests"


class Msg:
    """A consumed record as confluent_kafka hands it over: what the sweep reads of it."""

    def __init__(self, partition: int, offset: int, value: bytes, key: bytes | None = b"k", topic="inferlog.results"):
        self._t, self._p, self._o, self._v, self._k = topic, partition, offset, value, key

    def topic(self): return self._t
    def partition(self): return self._p
    def offset(self): return self._o
    def value(self): return self._v
    def key(self): return self._k
    def headers(self): return [("traceparent", b"00-x")]
    def error(self): return None


def answer(source_offset: int, worker: str = "w0", source_partition: int = 0) -> bytes:
    return CODEC.encode(RESULT, {
        "request_id": f"r-{source_offset}", "tenant": "acme", "task": "EMBED", "status": "OK",
        "outputs": [{"vector": [0.5]}], "error": None,
        "model": {"name": "m", "revision": None, "digest": None},
        "source": {"topic": REQ, "partition": source_partition, "offset": source_offset},
        "timings": {"created_at": 1, "consumed_at": 2, "completed_at": 3, "infer_ms": 1.0},
        "batch": {"batch_id": "b", "size": 1, "tokens": 1}, "worker_id": worker, "replay_run_id": None})


def test_only_this_workers_answers_are_candidates_and_the_sweeps_own_records_are_not():
    found = [Msg(0, 10, answer(5)), Msg(0, 11, answer(6, worker="w1")), Msg(0, 12, b"", key=SWEEP_KEY),
             Msg(0, 13, b"{\"results\": 3}", topic="inferlog.replays")]
    got = ours(found, CODEC, "w0")
    assert [(c.partition, c.offset, c.source) for c in got] == [(0, 10, (REQ, 0, 5))]
    assert got[0].headers == [("traceparent", b"00-x")] and got[0].key == b"k"


def test_an_invisible_answer_to_a_done_unanswered_request_is_produced_again():
    lost, redone, pending, shown = (Msg(0, 10, answer(5)), Msg(0, 11, answer(6)), Msg(0, 12, answer(7)),
                                    Msg(0, 13, answer(8)))
    candidates = ours([lost, redone, pending, shown], CODEC, "w0")
    visible = [shown, Msg(0, 20, answer(6, worker="w1"))]  # request 6 answered again by w1
    done = {(REQ, 0): 9}  # requests up to offset 8 are done: 5 and 7 lost their answers ...
    assert [c.source[2] for c in to_restore(candidates, visible, done, CODEC)] == [5, 7]
    done = {(REQ, 0): 7}  # ... or only up to 6: 7 is redone by its next owner, never restored
    assert [c.source[2] for c in to_restore(candidates, visible, done, CODEC)] == [5]
    assert to_restore(candidates, visible, {}, CODEC) == []  # nothing committed: all redone

"""Offset bookkeeping, without Kafka."""
import random

import pytest
from hypothesis import given, strategies as st

from inferlog.consumer.offsets import OffsetTracker

TP = ("req", 0)


def test_release_only_contiguous_prefix():
    t = OffsetTracker()
    e = t.assign(TP)
    for off in range(5):
        t.track(TP, off)
    t.complete(TP, 2, e, ["r2"])
    t.complete(TP, 1, e, ["r1"])
    assert t.release() == ([], {})  # 0 not done: nothing may be committed
    t.complete(TP, 0, e, ["r0"])
    assert t.release() == (["r0", "r1", "r2"], {TP: 3})
    assert t.pending == 2


def test_gaps_in_offsets_commit_past_them():
    t = OffsetTracker()
    e = t.assign(TP)
    for off in (10, 11, 15):  # 12-14 are e.g. transaction markers
        t.track(TP, off)
    for off in (10, 11, 15):
        t.complete(TP, off, e, [off])
    assert t.release() == ([10, 11, 15], {TP: 16})


def test_revoked_work_is_ignored_even_after_reassignment():
    t = OffsetTracker()
    old = t.assign(TP)
    t.track(TP, 0)
    assert t.revoke(TP) == 1
    assert t.pending == 0
    new = t.assign(TP)
    t.track(TP, 0)
    assert not t.complete(TP, 0, old, ["stale"])  # finished under the old assignment
    assert t.complete(TP, 0, new, ["fresh"])
    assert t.release() == (["fresh"], {TP: 1})


def test_offsets_never_go_backwards_nor_complete_twice():
    t = OffsetTracker()
    e = t.assign(TP)
    t.track(TP, 5)
    with pytest.raises(ValueError):
        t.track(TP, 5)
    t.complete(TP, 5, e, [])
    with pytest.raises(ValueError):
        t.complete(TP, 5, e, [])


def test_untracked_partition_is_not_ours():
    t = OffsetTracker()
    assert t.track(("other", 1), 0) is None


def test_release_only_selected_partitions():
    t = OffsetTracker()
    a, b = ("x", 0), ("x", 1)
    ea, eb = t.assign(a), t.assign(b)
    t.track(a, 0), t.track(b, 0)
    t.complete(a, 0, ea, ["a"]), t.complete(b, 0, eb, ["b"])
    assert t.release(only={b}) == (["b"], {b: 1})
    assert t.ready_count() == 1


@given(st.lists(st.integers(0, 3), min_size=1, max_size=200), st.randoms())
def test_any_completion_order_releases_everything_once_in_order(parts, rnd):
    t = OffsetTracker()
    epochs = {p: t.assign(("t", p)) for p in set(parts)}
    next_off = {p: 0 for p in epochs}
    recs = []
    for p in parts:
        t.track(("t", p), next_off[p])
        recs.append((p, next_off[p]))
        next_off[p] += 1
    rnd.shuffle(recs)
    released, commits = [], {}
    for p, off in recs:
        t.complete(("t", p), off, epochs[p], [(p, off)])
        out, c = t.release()
        released += out
        commits.update(c)
    assert sorted(released) == sorted(recs) and len(released) == len(recs)
    for p in epochs:  # within a partition, outputs come out in offset order
        assert [o for q, o in released if q == p] == list(range(next_off[p]))
        assert commits[("t", p)] == next_off[p]
    assert t.pending == 0


def test_pending_is_counted_per_topic():
    t = OffsetTracker()
    for tp in (("a", 0), ("a", 1), ("b", 0)):
        t.assign(tp)
        t.track(tp, 0)
    t.track(("a", 1), 1)
    assert (t.pending_in("a"), t.pending_in("b"), t.pending) == (3, 1, 4)


def test_the_engine_restarts_a_partition_whose_offsets_go_backwards():
    from types import SimpleNamespace

    from inferlog.consumer.engine import Engine
    from inferlog.settings import load_settings

    runner = SimpleNamespace(task="EMBED", info=SimpleNamespace(name="m", revision=None, digest=None),
                             max_input_tokens=512, tokenize=lambda texts: [[1, 2] for _ in texts])
    engine = Engine(load_settings(), runner)
    try:
        msg = lambda off: SimpleNamespace(topic=lambda: "t", partition=lambda: 0, offset=lambda: off,  # noqa: E731
                                          key=lambda: None, value=lambda: b"x", headers=lambda: None)
        engine.assign(("t", 0))
        assert engine.accept([msg(10), msg(11)]) == 2
        first = engine.tracker.epoch(("t", 0))
        assert engine.accept([msg(5)]) == 1  # went backwards: no crash, a fresh epoch
        assert engine.tracker.epoch(("t", 0)) != first and engine.pending == 1
    finally:
        engine.close()

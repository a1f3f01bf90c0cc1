"""The batching policy, without Kafka or a model."""
import random

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from inferlog.consumer.batching import BatchPolicy, Item, padded_cost


def item(i, length, t=0.0, rows=1, extra=0):
    return Item(ref=i, rows=rows, length=length, arrived=t, extra=extra)


def test_not_due_until_wait_or_size():
    p = BatchPolicy(max_batch_size=4, max_batch_tokens=10_000, max_wait_ms=50)
    p.add(item(0, 10, t=1.0))
    assert p.next_batch(now=1.01) is None
    assert p.due_at() == pytest.approx(1.05)
    batch = p.next_batch(now=1.05)
    assert [it.ref for it in batch] == [0]
    assert len(p) == 0


def test_closes_at_max_batch_size():
    p = BatchPolicy(max_batch_size=3, max_batch_tokens=10_000, max_wait_ms=1000)
    for i in range(5):
        p.add(item(i, 10))
    b = p.next_batch(now=0.0)
    assert len(b) == 3 and p.rows == 2
    assert p.next_batch(now=0.0) is None  # 2 rows left, not full, not waited
    assert [it.ref for it in p.next_batch(now=0.0, flush=True)] == [3, 4]


def test_rows_count_not_requests():
    p = BatchPolicy(max_batch_size=4, max_batch_tokens=10_000, max_wait_ms=1000)
    p.add(item(0, 10, rows=3))
    p.add(item(1, 10, rows=3))
    b = p.next_batch(now=0.0)
    assert [it.ref for it in b] == [0]  # 3 + 3 rows would exceed 4


def test_token_budget_counts_padding():
    # 4 rows padded to 100 tokens = 400 > 300: the long one may not join the short ones
    p = BatchPolicy(max_batch_size=100, max_batch_tokens=300, max_wait_ms=0)
    for i in range(3):
        p.add(item(i, 10))
    p.add(item(3, 100))
    b = p.next_batch(now=0.0)
    assert sorted(it.ref for it in b) == [0, 1, 2]
    assert padded_cost(b) <= 300
    assert [it.ref for it in p.next_batch(now=0.0)] == [3]


def test_oversized_single_item_still_goes_alone():
    p = BatchPolicy(max_batch_size=2, max_batch_tokens=50, max_wait_ms=0)
    p.add(item(0, 500))
    assert [it.ref for it in p.next_batch(now=0.0)] == [0]


def test_groups_by_length_around_the_oldest():
    p = BatchPolicy(max_batch_size=3, max_batch_tokens=10_000, max_wait_ms=0)
    lengths = [50, 5, 48, 6, 52, 7]  # oldest is 50 tokens long
    for i, n in enumerate(lengths):
        p.add(item(i, n, t=i * 0.001))
    first = p.next_batch(now=1.0)
    assert sorted(it.length for it in first) == [48, 50, 52]
    second = p.next_batch(now=1.0)
    assert sorted(it.length for it in second) == [5, 6, 7]


def test_generation_extra_tokens_count_in_budget():
    p = BatchPolicy(max_batch_size=10, max_batch_tokens=100, max_wait_ms=0)
    p.add(item(0, 10, extra=30))  # 1 x (10 + 30) = 40
    p.add(item(1, 10, extra=30))  # 2 x 40 = 80
    p.add(item(2, 10, extra=30))  # 3 x 40 = 120 > 100
    assert len(p.next_batch(now=0.0)) == 2


def test_remove_takes_items_out():
    p = BatchPolicy(max_batch_size=10, max_batch_tokens=1000, max_wait_ms=1000)
    for i in range(6):
        p.add(item(i, 10))
    gone = p.remove(lambda it: it.ref % 2 == 0)
    assert sorted(it.ref for it in gone) == [0, 2, 4]
    assert p.rows == 3
    assert sorted(it.ref for it in p.next_batch(0.0, flush=True)) == [1, 3, 5]


@pytest.mark.parametrize("tiered", [False, True], ids=["one queue", "two tiers with top-up"])
@hsettings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 300), st.integers(1, 4), st.integers(0, 64), st.booleans()),
             min_size=1, max_size=60),
    st.integers(1, 16),
    st.integers(64, 4096),
)
def test_every_item_once_and_limits_held(tiered, specs, max_size, max_tokens):
    from inferlog.consumer.batching import TieredPolicy

    p = (TieredPolicy if tiered else BatchPolicy)(max_batch_size=max_size, max_batch_tokens=max_tokens, max_wait_ms=10)
    for i, (length, rows, extra, high) in enumerate(specs):
        it = item(i, length, t=random.random(), rows=rows, extra=extra)
        if tiered:
            p.add(it, high=high)
        else:
            p.add(it)
    seen = []
    while len(p):
        b = p.next_batch(now=100.0)
        assert b, "a due queue must yield a batch"
        if len(b) > 1:  # a single item may exceed the limits alone; a group never does
            assert sum(it.rows for it in b) <= max_size
            assert padded_cost(b) <= max_tokens
        seen.extend(it.ref for it in b)
    assert sorted(seen) == list(range(len(specs)))
    assert all(q.rows == 0 for q in ((p.high, p.normal) if tiered else (p,)))


def test_tiers_high_goes_first_but_normal_is_not_starved():
    from inferlog.consumer.batching import TieredPolicy

    p = TieredPolicy(max_batch_size=1, max_batch_tokens=10_000, max_wait_ms=0, weight=3)
    for i in range(10):
        p.add(item(f"n{i}", 10, t=0.0))
    for i in range(10):
        p.add(item(f"h{i}", 10, t=1.0), high=True)  # arrived later, still served first
    order = [p.next_batch(now=2.0)[0].ref[0] for _ in range(8)]
    assert order == ["h", "h", "h", "n", "h", "h", "h", "n"]
    rest = []
    while len(p):
        rest.append(p.next_batch(now=2.0)[0].ref)
    assert sorted(rest) == sorted([f"h{i}" for i in range(6, 10)] + [f"n{i}" for i in range(2, 10)])


def test_tiers_wait_for_their_own_due_time():
    from inferlog.consumer.batching import TieredPolicy

    p = TieredPolicy(max_batch_size=8, max_batch_tokens=15, max_wait_ms=50)  # no room to top up: 2 x 10 > 15
    p.add(item("h", 10, t=1.0), high=True)
    p.add(item("n", 10, t=0.99))
    assert p.due_at() == pytest.approx(1.04)
    assert p.next_batch(now=1.045)[0].ref == "n"  # only the normal one has waited long enough
    assert p.next_batch(now=1.045) is None
    assert p.next_batch(now=1.05)[0].ref == "h"


def test_a_light_high_tier_is_topped_up_from_the_normal_backlog():
    """A fixed-cost device must not run a batch of three while a backlog waits: the high batch
    takes its own requests first, then the oldest normal ones that fit."""
    from inferlog.consumer.batching import TieredPolicy

    p = TieredPolicy(max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=50)
    for i in range(20):
        p.add(item(f"n{i}", 10, t=0.5 + i / 1000))
    for i in range(3):
        p.add(item(f"h{i}", 10, t=1.0), high=True)
    batch = [it.ref for it in p.next_batch(now=1.05)]
    assert batch == ["h0", "h1", "h2", "n0", "n1", "n2", "n3", "n4"]
    assert len(p.high) == 0 and len(p.normal) == 15


def test_a_due_normal_batch_takes_high_requests_along_before_their_time():
    from inferlog.consumer.batching import TieredPolicy

    p = TieredPolicy(max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=50)
    p.add(item("n", 10, t=0.99))
    p.add(item("h", 10, t=1.0), high=True)
    assert [it.ref for it in p.next_batch(now=1.045)] == ["n", "h"]  # h was not due until 1.05
    assert len(p) == 0 and p.next_batch(now=2.0) is None


@pytest.mark.parametrize("normal, expected", [
    ([("long", 40), ("short", 5)], ["h0", "h1"]),  # 3 x 40 = 120 tokens would be over 100
    ([("a", 12), ("b", 30)], ["h0", "h1", "a"]),  # 4 x 30 = 120 would not fit; 3 x 12 does
])
def test_a_top_up_keeps_to_the_token_limit(normal, expected):
    """Only what fits with the batch's own requests joins: a long normal request does not, and
    being the oldest of its tier it holds the others of its tier back (in-order by age)."""
    from inferlog.consumer.batching import TieredPolicy

    p = TieredPolicy(max_batch_size=8, max_batch_tokens=100, max_wait_ms=50)
    for k, (ref, length) in enumerate(normal):
        p.add(item(ref, length, t=0.5 + k / 10))
    for i in range(2):
        p.add(item(f"h{i}", 10, t=1.0), high=True)
    batch = p.next_batch(now=1.05)
    assert [it.ref for it in batch] == expected
    assert padded_cost(batch) <= 100

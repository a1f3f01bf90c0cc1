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
    assert p.due_at(1.0) == pytest.approx(1.04)
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


# -- adaptive batching (Pace): the wait and the batch size follow the load -----------------------
def adaptive(max_batch_size=32, max_wait_ms=20, latency_target_ms=300, cost=None, **kw):
    """A tiered adaptive policy whose device has run batches costing `cost(n)` seconds."""
    from inferlog.consumer.batching import Pace, TieredPolicy

    pace = Pace(max_batch_size, max_wait_ms, latency_target_ms, **kw)
    for n in (1, 4, 8, 16, 32):
        if cost is not None:
            pace.ran(n, cost(n))
    return TieredPolicy(max_batch_size, 100_000, max_wait_ms, pace=pace)


def feed(p, times, start=0, high=False):
    for k, t in enumerate(times):
        p.add(item(start + k, 10, t=t), high=high)


def linear(a, b):
    return lambda n: a + b * n


def test_pace_learns_the_arrival_rate_and_the_cost_line():
    from inferlog.consumer.batching import Pace

    pace = Pace(32, 20, 300, tau=1.0)
    for k in range(2000):  # 100 rows/s for 20 s
        pace.arrived(k * 0.01, 1)
    assert pace.rate(20.0) == pytest.approx(100, rel=0.02)
    assert pace.rate(25.0) < 1  # arrivals stopped: the rate falls away
    for n in (1, 2, 4, 8, 16, 32, 3, 5):
        pace.ran(n, 0.017 + 0.004 * n)
    a, b = pace.cost_line()
    assert a == pytest.approx(0.017, rel=1e-6) and b == pytest.approx(0.004, rel=1e-6)


def test_pace_target_rows_keeps_the_device_under_its_utilization():
    from inferlog.consumer.batching import Pace

    pace = Pace(32, 20, 300, utilization=0.8)
    for n in (1, 32):
        pace.ran(n, 0.02 + 0.004 * n)
    for rate in (5, 30, 60, 100, 150):
        pace._count, pace._t = rate * pace.tau, 0.0  # a rate, as if measured up to now
        n = pace.target_rows(0.0)
        assert rate * pace.cost(n) / n <= 0.8 + 1e-9  # the device keeps up with room to spare
        assert n == 1 or rate * pace.cost(n - 1) / (n - 1) > 0.8  # and no smaller batch would
    pace._count = 250 * pace.tau  # 250 rows/s at 4 ms each already fill the device: batch all it may
    assert pace.target_rows(0.0) == 32


def test_adaptive_cuts_a_lone_request_at_once_when_arrivals_are_sparse():
    p = adaptive(cost=linear(0.02, 0.004))
    for k in range(5):  # one request every 2 s, each cut the moment it arrives
        p.add(item(k, 10, t=2.0 * k))
        # the fixed rule would hold it max_wait_ms (20 ms) for batch-mates that will not come
        assert [it.ref for it in p.next_batch(2.0 * k)] == [k]


def test_adaptive_fills_batches_when_arrivals_are_dense():
    p = adaptive(cost=linear(0.02, 0.004))
    times = [k * 0.005 for k in range(400)]  # 200 requests/s for 2 s
    feed(p, times[:399])
    while len(p):  # take out what was due up to the last arrival, as the loop would
        if p.next_batch(times[398] + 0.0001) is None:
            break
    p.add(item(999, 10, t=2.0))
    now = 2.0
    n = p.pace.target_rows(now)
    assert n > 8  # 200/s with 20 ms per batch needs batches of ~12 for the device to keep up
    queued = p.high.rows + p.normal.rows
    assert queued < n
    assert p.next_batch(now) is None  # not yet: it waits for the rows the load needs ...
    feed(p, [now + 0.005 * (k + 1) for k in range(n - queued)], start=1000)
    batch = p.next_batch(now + 0.005 * (n - queued))
    assert batch is not None and len(batch) >= n  # ... and cuts as soon as they are in


def test_adaptive_never_holds_past_max_wait_or_the_latency_target():
    p = adaptive(max_wait_ms=20, cost=linear(0.02, 0.004))
    feed(p, [k * 0.005 for k in range(200)])  # a dense stream: it wants full batches
    while p.next_batch(1.0) is not None:
        pass
    p.add(item("late", 10, t=1.0))
    assert p.next_batch(1.0 + 0.0199) is None
    assert [it.ref for it in p.next_batch(1.02)] == ["late"]  # max_wait_ms, whatever the load wants
    # a latency target of 60 ms leaves nothing to wait when a batch of the rows wanted costs 30+ ms
    q = adaptive(max_wait_ms=20, latency_target_ms=60, cost=linear(0.03, 0.002))
    feed(q, [k * 0.005 for k in range(200)])
    while q.next_batch(1.0) is not None:
        pass
    q.add(item("late", 10, t=1.0))
    assert q.pace.cost(q.pace.target_rows(1.0)) > 0.03 and q.pace.hold(1.0) == 0
    assert [it.ref for it in q.next_batch(1.0)] == ["late"]


def test_adaptive_cuts_before_a_deadline():
    p = adaptive(max_wait_ms=20, cost=linear(0.02, 0.004))
    feed(p, [k * 0.005 for k in range(200)])
    while p.next_batch(1.0) is not None:
        pass
    p.add(Item(ref="urgent", rows=1, length=10, arrived=1.0, deadline=1.03))
    assert p.next_batch(1.0) is None
    # c(1) = 24 ms: at 1.006 it must start or be late
    assert p.due_at(1.0) == pytest.approx(1.03 - 0.024)
    assert [it.ref for it in p.next_batch(1.006)] == ["urgent"]


def test_adaptive_cuts_a_partial_batch_only_when_the_device_can_take_it():
    p = adaptive(max_batch_size=4, cost=linear(0.02, 0.004))
    feed(p, [0.0])
    assert p.next_batch(5.0, idle=False) is None  # waited long, but the device is busy: later
    assert p.due_at(5.0, idle=False) is None
    feed(p, [5.0, 5.0, 5.0], start=1)
    assert len(p.next_batch(5.0, idle=False)) == 4  # a full batch goes at once, busy or not
    feed(p, [6.0], start=9)
    assert [it.ref for it in p.next_batch(6.1, idle=True)] == [9]
    # the fixed rule cuts on its clock whatever the device does
    from inferlog.consumer.batching import TieredPolicy

    f = TieredPolicy(4, 100_000, 20)
    feed(f, [0.0])
    assert [it.ref for it in f.next_batch(0.02, idle=False)] == [0]


def test_adaptive_weighs_both_tiers_together():
    p = adaptive(max_batch_size=8, cost=linear(0.02, 0.004))
    p.pace._count = 400 * p.pace.tau  # dense: it wants full batches of 8
    p.pace._t = 0.0
    feed(p, [0.0] * 4, high=True)
    feed(p, [0.0] * 3, start=10)
    assert p.next_batch(0.0) is None  # 7 rows queued across the tiers, 8 wanted
    feed(p, [0.0], start=20)
    batch = p.next_batch(0.0)
    assert [it.ref for it in batch][:4] == [0, 1, 2, 3] and len(batch) == 8  # the high tier's first


def test_adaptive_high_requests_overtake_a_backlog_while_the_device_is_busy():
    p = adaptive(max_batch_size=8, cost=linear(0.02, 0.004))
    feed(p, [0.0] * 40)  # a normal backlog: full batches go while the device is busy
    assert len(p.next_batch(0.0, idle=False)) == 8
    feed(p, [0.1, 0.1], start=100, high=True)  # two urgent ones, a partial batch of their own
    batch = p.next_batch(0.1, idle=False)
    assert [it.ref for it in batch][:2] == [100, 101] and len(batch) == 8  # first, topped up to full
    # and a high flood does not starve a lone normal request: the weight still gives it its turn
    q = adaptive(max_batch_size=4, cost=linear(0.02, 0.004))
    feed(q, [0.0], start=500)
    feed(q, [0.0] * 40, high=True)
    tiers = ["n" if any(it.ref == 500 for it in q.next_batch(0.0, idle=False)) else "h" for _ in range(5)]
    assert tiers == ["h", "h", "h", "h", "n"]


# -- continuous batching's admission -----------------------------------------------------------
def test_admission_takes_what_fits_oldest_first_with_the_tiers_by_weight():
    from inferlog.consumer.batching import TieredPolicy

    p = TieredPolicy(max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=20, weight=2)
    for i in range(4):
        p.add(item(f"n{i}", 30 - i, t=float(i)))  # lengths do not matter here: arrival does
    for i in range(4):
        p.add(item(f"h{i}", 5 + i, t=10.0 + i), high=True)
    room = [5]

    def fits(it):
        if room[0] < it.rows:
            return False
        room[0] -= it.rows
        return True

    assert [it.ref for it in p.admit(fits)] == ["h0", "h1", "n0", "h2", "h3"]
    assert [it.ref for it in p.admit(fits)] == []  # full: nothing is taken, nothing is lost
    room[0] = 10
    assert [it.ref for it in p.admit(fits)] == ["n1", "n2", "n3"]
    assert len(p) == 0 and p.high.rows == p.normal.rows == 0


@hsettings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.booleans()), min_size=1, max_size=40), st.integers(1, 6))
def test_admission_serves_every_item_once_in_arrival_order_per_tier(specs, per_round):
    from inferlog.consumer.batching import TieredPolicy

    p = TieredPolicy(max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=20)
    for i, (rows, high) in enumerate(specs):
        p.add(item(i, 10, t=float(i), rows=rows), high=high)
    seen = []
    while len(p):
        budget = [per_round]
        got = p.admit(lambda it: budget[0] > 0 and not budget.__setitem__(0, budget[0] - 1))
        assert got, "a non-empty queue admits while there is room"
        seen += [it.ref for it in got]
    assert sorted(seen) == list(range(len(specs)))
    for high in (True, False):
        tier = [i for i in seen if specs[i][1] == high]
        assert tier == sorted(tier)  # nobody overtaken within a tier

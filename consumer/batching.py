"""The batching policy: which queued requests form the next batch, and when.

Pure: it sees queued items and a clock value, never Kafka or a model, so it is unit
tested on its own. A batch closes when the queue holds max_batch_size rows, or the rows
would pad to max_batch_tokens, or the oldest item has waited max_wait_ms, or the caller
flushes (shutdown, rebalance). The batch is cut from the queue sorted by length, around
the oldest item (so nothing starves) and extended towards the closest lengths (so little
padding is wasted).

That is the "fixed" rule. The "adaptive" one (the default, `Pace`) also knows whether the
device can take a batch now and what the load needs: a batch that is not full is cut only
when nothing is ahead of it for the device, and then as soon as it holds the rows the
arrival rate needs or its oldest request has waited what the latency target allows.
"""
from __future__ import annotations

import bisect
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(slots=True)
class Item:
    """One request waiting for a batch: `rows` texts, the longest `length` tokens."""

    ref: Any
    rows: int
    length: int
    arrived: float  # seconds, monotonic clock
    extra: int = 0  # tokens the batch grows by for this item (generation: max_new_tokens)
    deadline: float | None = None  # seconds, monotonic clock: the request is no use after it
    seq: int = field(default=0, compare=False)  # arrival order, set by the policy


def padded_tokens(rows: int, longest: int, extra: int = 0) -> int:
    """The one cost of a batch: the tokens it occupies once padded, rows x (longest input +
    longest extra). The batching policy caps it (max_batch_tokens); runners report it."""
    return rows * (longest + extra)


def padded_cost(items: Iterable[Item]) -> int:
    """padded_tokens of a batch of items."""
    rows = longest = extra = 0
    for it in items:
        rows += it.rows
        longest = max(longest, it.length)
        extra = max(extra, it.extra)
    return padded_tokens(rows, longest, extra)


class BatchPolicy:
    """Queue state is kept so every question the loop asks each turn is O(1): the items by
    length (a sorted list: the longest is its last), by arrival (an ordered dict: the oldest
    is its first), the row count and the generation extras (a counter of values)."""

    def __init__(self, max_batch_size: int, max_batch_tokens: int, max_wait_ms: float):
        if max_batch_size < 1 or max_batch_tokens < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1, max_wait_ms >= 0")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self._by_len: list[tuple[int, int, Item]] = []  # sorted by (length, seq)
        self._by_arrival: OrderedDict[int, Item] = OrderedDict()
        self._extras: Counter[int] = Counter()
        self._seq = 0
        self._rows = 0

    def __len__(self) -> int:
        return len(self._by_len)

    @property
    def rows(self) -> int:
        return self._rows

    def add(self, item: Item) -> None:
        item.seq = self._seq
        self._seq += 1
        bisect.insort(self._by_len, (item.length, item.seq, item))
        self._by_arrival[item.seq] = item
        self._extras[item.extra] += 1
        self._rows += item.rows

    def _forget(self, items: list[Item]) -> None:
        for it in items:
            del self._by_arrival[it.seq]
            self._extras[it.extra] -= 1
            if not self._extras[it.extra]:
                del self._extras[it.extra]
            self._rows -= it.rows

    def oldest(self) -> Item | None:
        return next(iter(self._by_arrival.values()), None)

    def due_at(self) -> float | None:
        """When the oldest item's wait runs out (None when empty)."""
        old = self.oldest()
        return None if old is None else old.arrived + self.max_wait

    def is_full(self) -> bool:
        """A batch of the most it may hold can be cut now: waiting cannot make it larger."""
        if not self._by_len:
            return False
        return (self._rows >= self.max_batch_size
                or padded_tokens(self._rows, self._by_len[-1][0], max(self._extras)) >= self.max_batch_tokens)

    def is_due(self, now: float) -> bool:
        if not self._by_len:
            return False
        return self.is_full() or now >= self.due_at()

    def items(self) -> Iterable[Item]:
        """The queued items, oldest first."""
        return self._by_arrival.values()

    def next_batch(self, now: float, flush: bool = False, base: tuple[int, int, int] | None = None) -> list[Item] | None:
        """The next batch if one is due (or anything is queued and flush is set). `base`:
        (rows, longest, extra) of a batch these items join (TieredPolicy's top-up): only what
        fits in it with them is taken, the oldest first, and [] when not even that fits."""
        if not self._by_len or not (flush or self.is_due(now)):
            return None
        entries = self._by_len
        old = self.oldest()
        rows, longest, extra = base or (0, 0, 0)
        rows, longest, extra = rows + old.rows, max(longest, old.length), max(extra, old.extra)
        if base is not None and (rows > self.max_batch_size
                                 or padded_tokens(rows, longest, extra) > self.max_batch_tokens):
            return []
        start = bisect.bisect_left(entries, (old.length, old.seq))  # the oldest item, in length order
        lo, hi = start, start + 1
        chosen = [old]
        while True:
            # candidates on either side in length order; take the one closest in length
            cands = []
            if lo > 0:
                cands.append((abs(entries[lo - 1][0] - old.length), -1))
            if hi < len(entries):
                cands.append((abs(entries[hi][0] - old.length), +1))
            if not cands:
                break
            taken = False
            for _, side in sorted(cands):
                it = entries[lo - 1][2] if side < 0 else entries[hi][2]
                r = rows + it.rows
                cost = padded_tokens(r, max(longest, it.length), max(extra, it.extra))
                if r <= self.max_batch_size and cost <= self.max_batch_tokens:
                    rows, longest, extra = r, max(longest, it.length), max(extra, it.extra)
                    chosen.append(it)
                    if side < 0:
                        lo -= 1
                    else:
                        hi += 1
                    taken = True
                    break
            if not taken:
                break
        del entries[lo:hi]
        self._forget(chosen)
        chosen.sort(key=lambda it: it.seq)
        return chosen

    def take_oldest(self) -> Item:
        """Take out the oldest item (continuous batching admits one at a time)."""
        old = self.oldest()
        del self._by_len[bisect.bisect_left(self._by_len, (old.length, old.seq))]
        self._forget([old])
        return old

    def remove(self, pred: Callable[[Item], bool]) -> list[Item]:
        """Take out (and return) every queued item matching `pred` (e.g. revoked partitions)."""
        gone = [e[2] for e in self._by_len if pred(e[2])]
        if gone:
            self._by_len = [e for e in self._by_len if not pred(e[2])]
            self._forget(gone)
        return gone


class Pace:
    """What adaptive batching knows of the load: the arrival rate and the device's cost per batch.

    - The arrival rate, rows per second: the rows seen, decayed with time constant `tau`
      seconds (a Poisson stream of rate r keeps it at r on average; it falls when arrivals stop).
    - The device's cost of a batch of n rows, c(n) = a + b*n: least squares over the batches
      it ran, each older one weighing `forget` times the next. With one batch size seen so far,
      b is 0 (a flat cost: it underestimates a larger batch, so it errs towards cutting early).
      Before any batch has run the cost is 0 and every batch is cut as soon as the device is free.

    From them, `target_rows`: the smallest batch with which the device keeps up with the
    arrivals while busy no more than `utilization` of the time, n >= rate * c(n) / utilization,
    so n = rate*a / (utilization - rate*b) (max_batch_size when even that cannot keep up). On a
    GPU the spare time is the margin for bursts; where the model and the broker share the CPU
    cores it is also what the commits and the broker run in. And `hold`: how long the oldest
    request of a partial batch may wait for it, max_wait_ms, or less when the latency target
    leaves less: the target minus the batch's own cost and one batch ahead of it.
    """

    def __init__(self, max_batch_size: int, max_wait_ms: float, latency_target_ms: float,
                 utilization: float = 0.8, tau: float = 1.0, forget: float = 0.95):
        if not 0 < utilization <= 1 or tau <= 0 or not 0 < forget < 1:
            raise ValueError("utilization must be in (0, 1], tau > 0, forget in (0, 1)")
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.target = latency_target_ms / 1000.0
        self.utilization, self.tau, self.forget = utilization, tau, forget
        self._count = 0.0  # decayed rows seen, as of self._t
        self._t: float | None = None
        self._sums = [0.0] * 5  # decayed sum of weights, n, n*n, seconds, n*seconds

    def arrived(self, now: float, rows: int) -> None:
        self._count = self._decayed(now) + rows
        self._t = now

    def _decayed(self, now: float) -> float:
        if self._t is None:
            return 0.0
        return self._count * math.exp(-max(0.0, now - self._t) / self.tau)

    def rate(self, now: float) -> float:
        """Rows per second arriving lately."""
        return self._decayed(now) / self.tau

    def ran(self, rows: int, seconds: float) -> None:
        """The device ran a batch of `rows` rows in `seconds`."""
        f, n = self.forget, float(rows)
        self._sums = [x * f + y for x, y in zip(self._sums, (1.0, n, n * n, seconds, n * seconds))]

    def cost_line(self) -> tuple[float, float]:
        """(a, b) of c(n) = a + b*n, both >= 0."""
        w, sn, snn, st, snt = self._sums
        if w <= 0:
            return 0.0, 0.0
        var = w * snn - sn * sn
        b = (w * snt - sn * st) / var if var > 1e-9 * w * w else 0.0
        if b <= 0:
            return max(0.0, st / w), 0.0
        a = (st - b * sn) / w
        if a < 0:  # a line through the origin is the closest non-negative one
            return 0.0, snt / snn
        return a, b

    def cost(self, rows: int) -> float:
        a, b = self.cost_line()
        return a + b * rows

    def target_rows(self, now: float) -> int:
        r = self.rate(now)
        a, b = self.cost_line()
        room = self.utilization - r * b
        if room <= 0:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, math.ceil(r * a / room - 1e-9)))

    def hold(self, now: float) -> float:
        """Seconds the oldest request of a partial batch may wait for batch-mates."""
        return max(0.0, min(self.max_wait, self.target - 2 * self.cost(self.target_rows(now))))


class TieredPolicy:
    """Two batching queues, high and normal priority, served by weight.

    When both tiers have a batch due, up to `weight` high batches go before one normal
    batch, so high-priority requests overtake a backlog without starving it. Each tier
    batches by the same limits. A batch cut with room left is topped up from the other tier
    (its oldest first, by the same limits): on a device whose cost is mostly per batch, a
    light high tier cut every max_wait_ms took 4 of 5 device slots with a few requests each
    while the normal backlog waited (BENCHMARKS.md, issue 14). The requests of the batch's
    own tier are chosen first, so topping up never delays them; those of the other tier
    only go sooner than on their own.
    """

    def __init__(self, max_batch_size: int, max_batch_tokens: int, max_wait_ms: float, weight: int = 4,
                 pace: Pace | None = None):
        self.high = BatchPolicy(max_batch_size, max_batch_tokens, max_wait_ms)
        self.normal = BatchPolicy(max_batch_size, max_batch_tokens, max_wait_ms)
        self.weight = weight
        self._credit = weight
        self.pace = pace  # None: the fixed rule; a Pace: adaptive batching (see Pace)

    def __len__(self) -> int:
        return len(self.high) + len(self.normal)

    def add(self, item: Item, high: bool = False) -> None:
        (self.high if high else self.normal).add(item)
        if self.pace is not None:
            self.pace.arrived(item.arrived, item.rows)

    def due_at(self, now: float, idle: bool = True) -> float | None:
        """When a batch falls due if nothing else changes (None: not before something does;
        -inf: now). `now` and `idle` matter to the adaptive rule only."""
        if self.pace is None:
            dues = [d for d in (self.high.due_at(), self.normal.due_at()) if d is not None]
            return min(dues) if dues else None
        if self.high.is_full() or self.normal.is_full():
            return float("-inf")
        if not idle or not len(self):
            return None  # a partial batch waits for the device: its end wakes the caller
        olds = [q.oldest() for q in (self.high, self.normal) if len(q)]
        due = min(o.arrived for o in olds) + self.pace.hold(now)
        cost = self.pace.cost(self.high.rows + self.normal.rows)  # of the batch they would make
        for q in (self.high, self.normal):
            for it in q.items():  # a partial batch: at most max_batch_size items per tier
                if it.deadline is not None:
                    due = min(due, it.deadline - cost)
        return due

    def _partial_due(self, now: float, idle: bool) -> bool:
        """Adaptive: a batch that is not full is due when the device can take it and it holds
        what the load needs, or its oldest has waited its hold, or waiting more would take a
        request past its deadline."""
        if not idle or not len(self):
            return False
        if self.high.rows + self.normal.rows >= self.pace.target_rows(now):
            return True
        return now >= self.due_at(now, idle)

    def next_batch(self, now: float, flush: bool = False, idle: bool = True) -> list[Item] | None:
        """The next batch, if one is due. `idle`: nothing is ahead of it for the device (the
        adaptive rule cuts a partial batch only then; the fixed rule does not ask)."""
        if self.pace is None:
            high_due = len(self.high) > 0 and (flush or self.high.is_due(now))
            normal_due = len(self.normal) > 0 and (flush or self.normal.is_due(now))
        else:
            # a full batch in either tier opens a slot, and the tiers share it by weight as
            # always: a few high requests go first (topped up from the backlog), not after it
            due = flush or self.high.is_full() or self.normal.is_full() or self._partial_due(now, idle)
            high_due = len(self.high) > 0 and due
            normal_due = len(self.normal) > 0 and due
        if high_due and (self._credit > 0 or not normal_due):
            self._credit -= 1
            return self._top_up(self.high.next_batch(now, flush=True), self.normal, now)
        if normal_due:
            self._credit = self.weight
            return self._top_up(self.normal.next_batch(now, flush=True), self.high, now)
        return None

    def admit(self, fits: Callable[[Item], bool]) -> list[Item]:
        """Continuous batching: the queued items a running batch takes now, oldest first within a
        tier and the tiers by weight as batches are (up to `weight` high items per normal one).
        `fits(item)` says whether the batch has room for it (and counts it in); the first that
        does not fit ends the admission, so no request is overtaken in its tier."""
        taken: list[Item] = []
        while len(self):
            high = len(self.high) > 0 and (self._credit > 0 or not len(self.normal))
            q = self.high if high else self.normal
            if not fits(q.oldest()):
                break
            taken.append(q.take_oldest())
            if high:
                self._credit -= 1
            else:
                self._credit = self.weight
        return taken

    @staticmethod
    def _top_up(batch: list[Item], other: BatchPolicy, now: float) -> list[Item]:
        rows = sum(it.rows for it in batch)
        if rows < other.max_batch_size and len(other):
            base = (rows, max(it.length for it in batch), max(it.extra for it in batch))
            batch += other.next_batch(now, flush=True, base=base)
        return batch

    def remove(self, pred) -> list[Item]:
        return self.high.remove(pred) + self.normal.remove(pred)

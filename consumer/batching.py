"""The batching policy: which queued requests form the next batch, and when.

Pure: it sees queued items and a clock value, never Kafka or a model, so it is unit
tested on its own. A batch closes when the queue holds max_batch_size rows, or the rows
would pad to max_batch_tokens, or the oldest item has waited max_wait_ms, or the caller
flushes (shutdown, rebalance). The batch is cut from the queue sorted by length, around
the oldest item (so nothing starves) and extended towards the closest lengths (so little
padding is wasted).
"""
from __future__ import annotations

import bisect
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

    def is_due(self, now: float) -> bool:
        if not self._by_len:
            return False
        if self._rows >= self.max_batch_size:
            return True
        if padded_tokens(self._rows, self._by_len[-1][0], max(self._extras)) >= self.max_batch_tokens:
            return True
        return now >= self.due_at()

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

    def remove(self, pred: Callable[[Item], bool]) -> list[Item]:
        """Take out (and return) every queued item matching `pred` (e.g. revoked partitions)."""
        gone = [e[2] for e in self._by_len if pred(e[2])]
        if gone:
            self._by_len = [e for e in self._by_len if not pred(e[2])]
            self._forget(gone)
        return gone


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

    def __init__(self, max_batch_size: int, max_batch_tokens: int, max_wait_ms: float, weight: int = 4):
        self.high = BatchPolicy(max_batch_size, max_batch_tokens, max_wait_ms)
        self.normal = BatchPolicy(max_batch_size, max_batch_tokens, max_wait_ms)
        self.weight = weight
        self._credit = weight

    def __len__(self) -> int:
        return len(self.high) + len(self.normal)

    def add(self, item: Item, high: bool = False) -> None:
        (self.high if high else self.normal).add(item)

    def due_at(self) -> float | None:
        dues = [d for d in (self.high.due_at(), self.normal.due_at()) if d is not None]
        return min(dues) if dues else None

    def next_batch(self, now: float, flush: bool = False) -> list[Item] | None:
        high_due = len(self.high) > 0 and (flush or self.high.is_due(now))
        normal_due = len(self.normal) > 0 and (flush or self.normal.is_due(now))
        if high_due and (self._credit > 0 or not normal_due):
            self._credit -= 1
            return self._top_up(self.high.next_batch(now, flush=True), self.normal, now)
        if normal_due:
            self._credit = self.weight
            return self._top_up(self.normal.next_batch(now, flush=True), self.high, now)
        return None

    @staticmethod
    def _top_up(batch: list[Item], other: BatchPolicy, now: float) -> list[Item]:
        rows = sum(it.rows for it in batch)
        if rows < other.max_batch_size and len(other):
            base = (rows, max(it.length for it in batch), max(it.extra for it in batch))
            batch += other.next_batch(now, flush=True, base=base)
        return batch

    def remove(self, pred) -> list[Item]:
        return self.high.remove(pred) + self.normal.remove(pred)

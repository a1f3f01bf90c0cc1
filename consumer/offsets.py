"""Offset bookkeeping: what may be committed, and which outputs go with it.

Pure. Records of a partition are consumed in offset order but can finish out of order
(batches are grouped by length). A transaction may only commit offset N if every record
below N in that partition has its output in the same or an earlier transaction; so
outputs wait here until the prefix of their partition is complete, and `release()` hands
out exactly the outputs that match the offsets it returns. Each assignment of a partition
has an epoch: work started under an earlier assignment is ignored when it finishes.
"""
from __future__ import annotations

from collections import deque
from typing import Any

TP = tuple[str, int]


class OffsetTracker:
    def __init__(self) -> None:
        self._epoch: dict[TP, int] = {}
        self._order: dict[TP, deque[int]] = {}
        self._done: dict[TP, dict[int, list[Any]]] = {}
        self._next_epoch = 0
        self._pending = 0
        self._per_topic: dict[str, int] = {}

    # -- assignment ----------------------------------------------------------------------
    def assign(self, tp: TP) -> int:
        self._next_epoch += 1
        self._epoch[tp] = self._next_epoch
        self._order[tp] = deque()
        self._done[tp] = {}
        return self._next_epoch

    def revoke(self, tp: TP) -> int:
        """Forget a partition; returns how many of its records were not yet released."""
        self._epoch.pop(tp, None)
        dropped = len(self._order.pop(tp, ()))
        self._done.pop(tp, None)
        self._count(tp, -dropped)
        return dropped

    def epoch(self, tp: TP) -> int | None:
        return self._epoch.get(tp)

    def owns(self, tp: TP, epoch: int) -> bool:
        return self._epoch.get(tp) == epoch

    @property
    def partitions(self) -> list[TP]:
        return list(self._epoch)

    # -- records -------------------------------------------------------------------------
    def track(self, tp: TP, offset: int) -> int | None:
        """A record was consumed; returns the epoch to carry with it (None if not ours)."""
        order = self._order.get(tp)
        if order is None:
            return None
        if order and offset <= order[-1]:
            raise ValueError(f"offset {offset} of {tp} consumed after {order[-1]}: offsets never go backwards")
        order.append(offset)
        self._count(tp, 1)
        return self._epoch[tp]

    def complete(self, tp: TP, offset: int, epoch: int, outputs: list[Any]) -> bool:
        """The record's outputs are ready. False (and ignored) if its assignment is gone."""
        if self._epoch.get(tp) != epoch:
            return False
        done = self._done[tp]
        if offset in done:
            raise ValueError(f"{tp}@{offset} completed twice")
        done[offset] = outputs
        return True

    @property
    def pending(self) -> int:
        """Records consumed and not yet released for commit."""
        return self._pending

    def pending_in(self, topic: str) -> int:
        """Records of one topic consumed and not yet released."""
        return self._per_topic.get(topic, 0)

    def _count(self, tp: TP, n: int) -> None:
        self._pending += n
        self._per_topic[tp[0]] = self._per_topic.get(tp[0], 0) + n

    def ready_count(self) -> int:
        n = 0
        for tp, order in self._order.items():
            done = self._done[tp]
            for off in order:
                if off not in done:
                    break
                n += 1
        return n

    def release(self, only: set[TP] | None = None) -> tuple[list[Any], dict[TP, int]]:
        """Pop every completed prefix: (outputs in offset order, {tp: offset to commit})."""
        outputs: list[Any] = []
        commits: dict[TP, int] = {}
        for tp, order in self._order.items():
            if only is not None and tp not in only:
                continue
            done = self._done[tp]
            last = None
            while order and order[0] in done:
                last = order.popleft()
                outputs.extend(done.pop(last))
                self._count(tp, -1)
            if last is not None:
                commits[tp] = last + 1
        return outputs, commits

"""Fault injection for tests and chaos runs: a runner that fails on chosen requests.

It wraps a real runner. A batch holding a faulty row raises in the device stage, as a real
model failure would; the pipeline must then split the batch until only the faulty requests
fail. A row is faulty when its token ids contain the marker's ids, or when a seeded hash of
its ids falls below `rate`. The random fault is a property of the request, not of the batch:
a per-batch coin would fail a half on one try and pass it on the next, and the split could
never name a culprit. Slow batches (a sleep on the device thread) are per batch and seeded.
"""
from __future__ import annotations

import hashlib
import random
import struct
import threading
import time


class InjectedFault(RuntimeError):
    pass


def fault_score(ids: list[int], seed: int) -> float:
    """A uniform number in [0, 1) fixed by the token ids and the seed, the same in every process."""
    h = hashlib.blake2b(struct.pack(f"<q{len(ids)}q", seed, *ids), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


class FaultyRunner:
    def __init__(self, inner, marker: str | None = None, *, rate: float = 0.0, seed: int = 0,
                 slow_ms: float = 0.0, slow_rate: float = 0.1):
        self.inner = inner
        self.rate, self.seed, self.slow_ms, self.slow_rate = rate, seed, slow_ms, slow_rate
        self.needle: list[int] = []
        if marker:
            # ids of the marker without special tokens: strip what tokenize adds to an empty string
            empty = inner.tokenize([""])[0]
            ids = inner.tokenize([marker])[0]
            self.needle = [i for i in ids if i not in empty] or ids
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()  # run() is on one device thread, but be safe with replay pools

    @classmethod
    def from_settings(cls, inner, s) -> "FaultyRunner":
        return cls(inner, s.fault_marker, rate=s.fault_rate, seed=s.fault_seed, slow_ms=s.fault_slow_ms,
                   slow_rate=s.fault_slow_rate)

    # faults are injected in prepare/run of the static stages: a faulty generator runs static
    supports_continuous = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def faulty(self, ids: list[int]) -> bool:
        """Whether a row with these token ids makes the model raise."""
        if self.rate and fault_score(ids, self.seed) < self.rate:
            return True
        n = len(self.needle)
        return bool(n) and any(ids[i : i + n] == self.needle for i in range(len(ids) - n + 1))

    def prepare(self, rows):
        return self.inner.prepare(rows), any(self.faulty(r.ids) for r in rows)

    def run(self, prepared):
        inner, faulty = prepared
        if self.slow_ms:
            with self._rng_lock:
                pause = self._rng.random() * self.slow_ms / 1000 if self._rng.random() < self.slow_rate else 0.0
            if pause:
                time.sleep(pause)
        if faulty:
            raise InjectedFault("injected model fault")
        return self.inner.run(inner)

    def finish(self, raw, prepared):
        return self.inner.finish(raw, prepared[0])

    def warmup(self) -> None:
        self.inner.warmup()


def wants_faults(s) -> bool:
    return bool(s.fault_marker or s.fault_rate or s.fault_slow_ms)

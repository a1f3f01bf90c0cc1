"""Fault injection for tests and chaos runs: a runner that fails on marked requests.

It wraps a real runner. A batch holding a row whose token ids contain the marker's ids
raises in the device stage, as a real model failure would; the pipeline must then split
the batch until only the marked requests fail.
"""
from __future__ import annotations


class InjectedFault(RuntimeError):
    pass


class FaultyRunner:
    def __init__(self, inner, marker: str):
        self.inner = inner
        # ids of the marker without special tokens: strip what tokenize adds to an empty string
        empty = inner.tokenize([""])[0]
        ids = inner.tokenize([marker])[0]
        self.needle = [i for i in ids if i not in empty] or ids

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _marked(self, ids: list[int]) -> bool:
        n = len(self.needle)
        return any(ids[i : i + n] == self.needle for i in range(len(ids) - n + 1))

    def prepare(self, rows):
        return self.inner.prepare(rows), any(self._marked(r.ids) for r in rows)

    def run(self, prepared):
        inner, marked = prepared
        if marked:
            raise InjectedFault("injected model fault")
        return self.inner.run(inner)

    def finish(self, raw, prepared):
        return self.inner.finish(raw, prepared[0])

    def warmup(self) -> None:
        self.inner.warmup()

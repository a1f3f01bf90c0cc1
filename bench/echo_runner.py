"""A model that does no model work: what is left of a run is Kafka, Avro, batching and commits."""
from __future__ import annotations

import time

import torch

from inferlog.consumer.runners import Row, Runner
from inferlog.consumer.models import ModelInfo


class EchoRunner(Runner):
    """Runner API (task EMBED) with no torch work: the 'embedding' of a text is one float, its
    token count, so the result is tiny and the figure is the pipeline's own cost per record."""

    task = "EMBED"

    def __init__(self, max_input_tokens: int = 512):
        # no super().__init__: there is no model or tokenizer to hold
        self.info = ModelInfo("bench-echo", None, None)
        self.device = torch.device("cpu")
        self.max_input_tokens = max_input_tokens

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[1] * (t.count(" ") + 2) for t in texts]  # a 'token' per word, plus two specials

    def prepare(self, rows: list[Row]) -> list[int]:
        self._check_lengths(rows)
        return [len(r.ids) for r in rows]

    def run(self, prepared: list[int]) -> list[int]:
        return prepared

    def finish(self, raw: list[int], prepared) -> list[dict]:
        return [{"vector": [float(n)]} for n in raw]


class SleepRunner(EchoRunner):
    """The echo runner with a device that costs time and no CPU: run() sleeps a fixed time per
    batch, whatever its size, as a small model's forward on a GPU does. On a machine whose cores
    the broker and the workers share, this is what can show whether N workers give N times one:
    a CPU model only splits the same cores (bench/scaling_bench.py)."""

    def __init__(self, batch_ms: float = 50.0, max_input_tokens: int = 512):
        super().__init__(max_input_tokens)
        self.info = ModelInfo(f"bench-sleep-{batch_ms:g}ms", None, None)
        self.batch_s = batch_ms / 1000

    def run(self, prepared: list[int]) -> list[int]:
        time.sleep(self.batch_s)  # releases the GIL: the worker's other threads go on
        return prepared


class SharedDeviceRunner(SleepRunner):
    """The sleep runner with one device for every process on this host: run() holds an exclusive
    lock on `lock_path` while it sleeps, so batches from several worker processes take turns, as
    kernels from several processes on one GPU do (time-sliced, no MPS). What it shows is whether
    N processes feed one device more than one process can: the device time costs no CPU, the
    worker's own work (decode, batching, result encoding, commits) costs what it does."""

    def __init__(self, batch_ms: float, lock_path: str, max_input_tokens: int = 512):
        super().__init__(batch_ms, max_input_tokens)
        self.info = ModelInfo(f"bench-shared-{batch_ms:g}ms", None, None)
        self._lock = open(lock_path, "a")

    def run(self, prepared: list[int]) -> list[int]:
        import fcntl

        fcntl.flock(self._lock, fcntl.LOCK_EX)  # waits while another process's batch runs
        try:
            time.sleep(self.batch_s)
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        return prepared

"""A model that does no model work: what is left of a run is Kafka, Avro, batching and commits."""
from __future__ import annotations

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

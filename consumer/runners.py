"""Model runners: rows of token ids in, one output dict per row out.

A runner knows nothing about Kafka or requests. The worker calls tokenize/prepare/finish
on CPU threads and run on its single device thread, so everything but `run` must be
safe to call concurrently and must not touch the device.
"""
from __future__ import annotations

import logging
import os
import random
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from inferlog.errors import ConfigError, InputTooLarge
from inferlog.request import Parameters

from .batching import padded_tokens
from .faults import FaultyRunner, wants_faults
from .models import (
    sentence_limit,
    ModelInfo,
    from_pretrained_kwargs,
    identity,
    local_dir,
    max_positions,
    resolve_device,
    resolve_dtype,
    resolve_task,
)

__all__ = ["Row", "ModelInfo", "Runner", "EmbedRunner", "GenerateRunner", "ClassifyRunner", "load_runner"]

_seed_source = random.SystemRandom()


log = logging.getLogger(__name__)

def sampling_temperature(p: Parameters) -> float:
    """The temperature a row samples at; 0.0 is greedy (no temperature, or one so small that
    dividing the logits by it would overflow)."""
    t = p.temperature or 0.0
    return t if t >= 1e-5 else 0.0


@dataclass(slots=True)
class Row:
    ids: list[int]  # token ids from Runner.tokenize (special tokens included)
    params: Parameters


class Runner(ABC):
    task: str
    info: ModelInfo
    device: torch.device
    max_input_tokens: int
    # tokens a generation adds when a request does not say (settings.default_max_new_tokens;
    # the engine sets it): the one place this default lives
    default_max_new_tokens: int = 32
    supports_continuous = False  # can run under consumer/continuous.py (generation only)

    def __init__(self, model, tokenizer, info: ModelInfo, device: torch.device, max_input_tokens: int):
        self.model, self.info, self.device, self.max_input_tokens = model, info, device, max_input_tokens
        self.hf_tokenizer = tokenizer
        self._pin = device.type == "cuda"
        self.pad_id = self._pad_id(tokenizer, model.config)
        self._backend = None
        self._lock = threading.Lock()
        if getattr(tokenizer, "is_fast", False):
            # A private copy of the Rust tokenizer with truncation and padding switched off once,
            # here: encode_batch then never mutates it, so threads can share it ("Already
            # borrowed" comes from the per-call truncation/padding updates of tokenizer(...)).
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()

    @staticmethod
    def _pad_id(tokenizer, config) -> int:
        for v in (tokenizer.pad_token_id, getattr(config, "pad_token_id", None), tokenizer.eos_token_id):
            if isinstance(v, int):
                return v
        return 0  # always masked out, so any id will do

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=True)]
        with self._lock:  # slow (Python) tokenizers: no promise of thread safety
            return [self.hf_tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]

    def new_tokens(self, p: Parameters) -> int:
        """Tokens a row grows by on the device: none but for generation."""
        return 0

    def cost(self, lengths: list[int], params: list[Parameters]) -> int:
        """The batch's padded tokens (batching.padded_tokens), as the batching policy counts them."""
        return padded_tokens(len(lengths), max(lengths, default=0), max(map(self.new_tokens, params), default=0))

    def _check_lengths(self, rows: list[Row]) -> None:
        for r in rows:
            if not r.ids or len(r.ids) > self.max_input_tokens:
                raise InputTooLarge(f"{len(r.ids)} tokens; the model takes 1 to {self.max_input_tokens}")

    def _pad(self, rows: list[Row], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.ids)
            sl = slice(width - n, width) if left else slice(0, n)
            ids[i, sl] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, sl] = 1
        if self._pin:  # pinned host memory lets run() copy with non_blocking=True
            ids, mask = ids.pin_memory(), mask.pin_memory()
        return ids, mask

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    @abstractmethod
    def prepare(self, rows: list[Row]) -> Any: ...

    @abstractmethod
    def run(self, prepared) -> Any: ...

    @abstractmethod
    def finish(self, raw, prepared) -> list[dict]: ...

    def warmup(self) -> None:
        rows = [Row(ids, Parameters(max_new_tokens=2)) for ids in self.tokenize(["warm up", "a warm up"])]
        prepared = self.prepare(rows)
        self.finish(self.run(prepared), prepared)


class _EncoderRunner(Runner):
    """Right padding; run returns CPU tensors so finish never waits on the device stream."""

    def prepare(self, rows: list[Row]) -> dict:
        self._check_lengths(rows)
        ids, mask = self._pad(rows, left=False)
        return {"input_ids": ids, "attention_mask": mask}

    def _forward(self, prepared: dict):
        return self.model(**{k: self._to_device(v) for k, v in prepared.items()})


class EmbedRunner(_EncoderRunner):
    task = "EMBED"

    def run(self, prepared: dict) -> torch.Tensor:
        with torch.inference_mode():
            hidden = self._forward(prepared).last_hidden_state.float()
            mask = self._to_device(prepared["attention_mask"]).unsqueeze(-1).to(hidden.dtype)
            # mean pooling over real tokens, then L2 norm: what sentence-transformers does
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).cpu()

    def finish(self, raw: torch.Tensor, prepared) -> list[dict]:
        # float32 rows as they lie in memory (no list of Python floats): the result builder
        # writes them into the Avro record as they are (inferlog.codec.encode_embeddings)
        return [{"vector": v} for v in raw.numpy()]


class ClassifyRunner(_EncoderRunner):
    task = "CLASSIFY"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        id2label = self.model.config.id2label or {}
        n = self.model.config.num_labels
        self.labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(n)]
        if getattr(self.model.config, "pad_token_id", None) is None:
            # causal classifiers pick the last non-pad token and refuse batches without a pad id
            self.model.config.pad_token_id = self.pad_id

    def run(self, prepared: dict) -> torch.Tensor:
        with torch.inference_mode():
            return self._forward(prepared).logits.float().softmax(-1).cpu()

    def finish(self, raw: torch.Tensor, prepared) -> list[dict]:
        out = []
        for probs in raw.tolist():
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append({"label": self.labels[best], "score": probs[best], "scores": dict(zip(self.labels, probs))})
        return out


class GenerateRunner(Runner):
    task = "GENERATE"
    supports_continuous = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._cache_name: str | None = None  # the KV cache argument of this transformers (see _cache_kwarg)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.hf_tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def new_tokens(self, p: Parameters) -> int:
        return p.max_new_tokens or self.default_max_new_tokens

    def prepare(self, rows: list[Row]) -> dict:
        self._check_lengths(rows)
        limits, temps, top_ps, seeds = [], [], [], []
        for r in rows:
            limits.append(self.room(r.ids, r.params))
            t = sampling_temperature(r.params)
            temps.append(t)
            top_ps.append(r.params.top_p or 1.0)
            # a row that samples without a seed still gets its own generator, freshly seeded
            seeds.append(None if t <= 0 else r.params.seed if r.params.seed is not None else _seed_source.getrandbits(63))
        ids, mask = self._pad(rows, left=True)  # left: every row's next token sits in the last column
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "limits": limits,
            "temperature": torch.tensor(temps, dtype=torch.float32),
            "top_p": torch.tensor(top_ps, dtype=torch.float32),
            "seeds": seeds,
        }

    def _pick(self, logits: torch.Tensor, temp: torch.Tensor, top_p: torch.Tensor, gens: list) -> torch.Tensor:
        """Greedy for temperature 0; otherwise Gumbel-max over temperature/top-p filtered logits.

        Each sampling row draws its noise from its own generator, so its tokens depend only on
        its prompt and seed, never on which other rows share the batch.
        """
        logits = logits.float()
        sampling = [i for i, g in enumerate(gens) if g is not None]
        if not sampling:
            return logits.argmax(-1)
        idx = torch.tensor(sampling, device=logits.device)
        sub = logits[idx] / temp[idx].unsqueeze(-1)
        if bool((top_p[idx] < 1).any()):
            sorted_l, order = sub.sort(-1, descending=True)
            probs = sorted_l.softmax(-1)
            # drop a token when the mass before it already reaches top_p (the first always stays)
            drop = (probs.cumsum(-1) - probs) >= top_p[idx].unsqueeze(-1)
            sub = sub.scatter(-1, order, sorted_l.masked_fill(drop, float("-inf")))
        # -log(Exp(1)) is Gumbel(0, 1); argmax(logits + Gumbel) samples from softmax(logits)
        noise = torch.stack([torch.empty(sub.shape[-1], device=sub.device).exponential_(generator=gens[i]) for i in sampling])
        out = logits.argmax(-1)
        out[idx] = (sub - noise.log()).argmax(-1)
        return out

    def run(self, prepared: dict) -> torch.Tensor:
        dev = self.device
        ids = self._to_device(prepared["input_ids"])
        mask = self._to_device(prepared["attention_mask"])
        temp = prepared["temperature"].to(dev)
        top_p = prepared["top_p"].to(dev)
        limits = torch.tensor(prepared["limits"], device=dev)
        gens = [None if s is None else torch.Generator(device=dev).manual_seed(s) for s in prepared["seeds"]]
        eos = torch.tensor(sorted(self.eos_token_ids) or [-1], device=dev)
        steps = max(prepared["limits"])
        out = torch.full((ids.shape[0], steps), self.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
        # positions count real tokens only, so a left-padded row sees the positions it would alone
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            for step in range(steps):
                nxt = self._pick(res.logits[:, -1, :], temp, top_p, gens)
                nxt = nxt.masked_fill(done, self.pad_id)
                out[:, step] = nxt
                done |= torch.isin(nxt, eos) | (limits <= step + 1)
                if step + 1 == steps or bool(done.all()):
                    break
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                pos = pos[:, -1:] + 1
                res = self.model(input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=pos,
                                 use_cache=True, **self._cache_kwarg(res))
        return out.cpu()

    def _cache_kwarg(self, res) -> dict:
        """The KV cache of the last step, by the name this transformers gives it: `cache` from
        5.x on (`past_key_values` warns there), `past_key_values` before."""
        if self._cache_name is None:
            import inspect

            self._cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
                else "past_key_values"
        return {self._cache_name: getattr(res, self._cache_name)}

    def finish(self, raw: torch.Tensor, prepared) -> list[dict]:
        return [self.output(row, limit) for row, limit in zip(raw.tolist(), prepared["limits"])]

    def limit(self, ids: list[int], p: Parameters) -> int:
        """New tokens a row may add: what it asks (or the default), within the model's positions."""
        return min(self.new_tokens(p), self.max_input_tokens - len(ids))

    def room(self, ids: list[int], p: Parameters) -> int:
        """limit(), or InputTooLarge when the prompt leaves no position for a new token."""
        if len(ids) >= self.max_input_tokens:
            raise InputTooLarge(f"{len(ids)} prompt tokens leave no room in {self.max_input_tokens} positions")
        return self.limit(ids, p)

    def output(self, tokens: list[int], limit: int) -> dict:
        """A row's generated tokens as its output: an eos ends it, counts as generated, never as text."""
        toks, reason = list(tokens[:limit]), "length"
        for i, t in enumerate(toks):
            if t in self.eos_token_ids:
                toks, reason = toks[: i + 1], "stop"
                break
        text_ids = toks[:-1] if reason == "stop" else toks
        return {"text": self.hf_tokenizer.decode(text_ids, skip_special_tokens=True), "tokens": len(toks),
                "finish_reason": reason}


_RUNNERS = {"EMBED": EmbedRunner, "GENERATE": GenerateRunner, "CLASSIFY": ClassifyRunner}


def load_runner(
    model: str, *, task: str | None = None, device: str = "auto", dtype: str = "auto", name: str | None = None
) -> Runner:
    """Load `model` (a local directory or a hub id, cached files only when HF_HUB_OFFLINE=1)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load is noise in a worker's log

    try:
        config = AutoConfig.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as e:
        raise ConfigError(f"cannot load model {model!r}: {e}") from e
    task = resolve_task(config, task, model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    auto = {"EMBED": AutoModel, "GENERATE": AutoModelForCausalLM, "CLASSIFY": AutoModelForSequenceClassification}[task]
    try:
        net = auto.from_pretrained(model, config=config, **from_pretrained_kwargs(torch_dtype))
    except OSError as e:
        raise ConfigError(f"cannot load weights of {model!r}: {e}") from e
    net.to(dev).eval()
    directory = local_dir(model)
    info = identity(model, config, directory, name)
    limit = max_positions(config, tokenizer)
    if task == "EMBED" and (trained := sentence_limit(directory)):
        limit = min(limit, trained)
    return _RUNNERS[task](net, tokenizer, info, dev, limit)


def model_threads(setting: int) -> int:
    """torch's intra-op threads for a CPU model: the setting, or one fewer than the cores this
    process may run on (at least one)."""
    if setting:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


def share_cores(settings, runner) -> None:
    """A model on the CPU gets all cores but one. With torch's default (one thread per core) its
    parallel regions stalled whenever the loop, the CPU pool, librdkafka or a broker on the same
    machine took a core: on 2 cores a batch ran 1.5x slower inside the worker than alone; with one
    thread, 1.1x, and the worker drained more (BENCHMARKS.md, issue 15)."""
    device = getattr(runner, "device", None)
    if getattr(device, "type", None) != "cpu":
        return
    n = model_threads(settings.torch_threads)
    if torch.get_num_threads() != n:  # the CLI sets it before warm-up; the engine for other drivers
        torch.set_num_threads(n)


def build_runner(settings):
    """The runner a worker or a replay serves: the model of the settings, its CPU threads set
    before the warm-up starts torch's thread pool, and fault injection when the settings ask."""
    runner = load_runner(settings.model, task=settings.task, device=settings.device, dtype=settings.dtype,
                         name=settings.model_name)
    share_cores(settings, runner)
    if wants_faults(settings):
        log.warning("fault injection is ON (marker %r, rate %s, slow %s ms): for tests and chaos runs only",
                    settings.fault_marker, settings.fault_rate, settings.fault_slow_ms)
        runner = FaultyRunner.from_settings(runner, settings)
    return runner

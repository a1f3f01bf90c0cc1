"""Finding and loading a model: task, device, dtype, identity (name, revision, digest).

Kept apart from the runners so that the runners only deal with tensors.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from inferlog.errors import ConfigError
from inferlog.settings import served_name_of

TASKS = ("EMBED", "GENERATE", "CLASSIFY")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    revision: str | None
    digest: str | None  # first 16 hex of sha256 over the weight files


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r} is not a torch device (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32  # half precision on CPU is slow and lossy
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    return table[dtype]


def _arch_kinds(config) -> tuple[bool, bool]:
    """(is a causal LM, is a sequence classifier), judged from config.architectures."""
    from transformers.models.auto import modeling_auto as ma

    causal_names = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    seqcls_names = set(ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())
    archs = config.architectures or []
    # GPT-2 and a few others say "LMHeadModel", not "ForCausalLM"; the mapping knows them.
    causal = any(a in causal_names or a.endswith("ForCausalLM") for a in archs)
    seqcls = any(a in seqcls_names or a.endswith("ForSequenceClassification") for a in archs)
    return causal, seqcls


def resolve_task(config, task: str | None, model: str) -> str:
    causal, seqcls = _arch_kinds(config)
    inferred = "GENERATE" if causal else "CLASSIFY" if seqcls else "EMBED"
    if task is None:
        return inferred
    task = task.upper()
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    archs = ", ".join(config.architectures or []) or f"model_type {config.model_type!r} with no architectures"
    # Loading a head the checkpoint lacks would "work" with random weights: refuse instead.
    if task == "GENERATE" and not causal:
        raise ConfigError(f"{model} cannot GENERATE: it is {archs}, not a causal LM (…ForCausalLM)")
    if task == "CLASSIFY" and not seqcls:
        raise ConfigError(f"{model} cannot CLASSIFY: it is {archs}, not a …ForSequenceClassification")
    if task == "EMBED" and causal:
        raise ConfigError(f"{model} cannot EMBED: it is a causal LM ({archs}); mean pooling needs an encoder")
    return task


def local_dir(model: str) -> Path | None:
    """The directory holding the files: the path itself, or the cached hub snapshot."""
    if os.path.isdir(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except (OSError, ValueError):  # not cached, or not a hub id: identity simply lacks a digest
        return None


def weights_digest(directory: Path | None) -> str | None:
    if directory is None:
        return None
    files = sorted(directory.glob("*.safetensors")) or sorted(
        p for ext in ("*.bin", "*.pt", "*.pth") for p in directory.glob(ext) if "training_args" not in p.name
    )
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:  # sorted by name, contents only: the same weights give the same digest anywhere
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def identity(model: str, config, directory: Path | None, name: str | None) -> ModelInfo:
    revision = getattr(config, "_commit_hash", None)
    if directory is not None and os.path.isdir(model):
        d = directory.resolve()
        if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
            revision = revision or d.name
    elif directory is not None and directory.parent.name == "snapshots":
        revision = revision or directory.name
    guessed = served_name_of(model)
    return ModelInfo(name or guessed, revision, weights_digest(directory))


def sentence_limit(directory: Path | None) -> int | None:
    """A sentence-transformers model's trained length (sentence_bert_config.json), if it has one:
    beyond it the embeddings are not the model's, even where positions remain."""
    f = directory / "sentence_bert_config.json" if directory else None
    if f is None or not f.is_file():
        return None
    import json

    return json.loads(f.read_text()).get("max_seq_length")


def max_positions(config, tokenizer) -> int:
    n = next(
        (getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx") if getattr(config, k, None)),
        None,
    )
    tok_max = getattr(tokenizer, "model_max_length", None)
    # tokenizers say 1e30 when they do not know; RoBERTa-likes have positions = max + 2
    if tok_max and tok_max < 1_000_000:
        n = min(n, tok_max) if n else tok_max
    if not n:
        raise ConfigError("the model declares no maximum length (max_position_embeddings / n_positions)")
    return int(n)


def from_pretrained_kwargs(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # `dtype=` replaced `torch_dtype=` in transformers 4.56
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}

"""Tiny models built on the spot (no downloads): a 2-layer GPT-2 and a 2-layer BERT classifier.

Each comes with a tokenizer trained here with the `tokenizers` library, saved next to the
weights so that `from_pretrained(dir)` loads both. Use the functions directly, or the
session-scoped fixtures by importing them into a test module (or a conftest).
"""
from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = [
    f"the {a} {b} jumps over the {c} dog number {i}."
    for i, (a, b, c) in enumerate(
        (a, b, c)
        for a in ("quick", "slow", "red", "tiny", "loud")
        for b in ("fox", "cat", "bird", "horse")
        for c in ("lazy", "sleepy", "happy")
    )
] + [
    "kafka topics carry records between producers and consumers.",
    "a worker batches requests and commits offsets after it produces results.",
    "streaming inference turns every request into exactly one result.",
]

EOS = "<|endoftext|>"
LABELS = {0: "negative", 1: "positive"}


def build_tiny_gpt2(directory: str | Path, *, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory = Path(directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    eos_id = fast.convert_tokens_to_ids(EOS)

    torch.manual_seed(seed)
    # a wide initializer so that greedy decoding wanders instead of repeating one token
    cfg = GPT2Config(
        vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eos_id, eos_token_id=eos_id, initializer_range=0.3,
    )
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def build_tiny_bert_classifier(directory: str | Path, *, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    directory = Path(directory)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=fast.pad_token_id,
        num_labels=len(LABELS), id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
        initializer_range=0.3,
    )
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_bert_classifier_dir(tmp_path_factory) -> Path:
    return build_tiny_bert_classifier(tmp_path_factory.mktemp("tiny-bert-cls"))

"""Model runners on CPU: the embedded MiniLM, and tiny GPT-2 / BERT models built on the spot."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inferlog.consumer.runners import Row, load_runner  # noqa: E402
from inferlog.errors import ConfigError, InputTooLarge  # noqa: E402
from inferlog.request import Parameters as P  # noqa: E402
from inferlog.settings import default_model_path  # noqa: E402
from tinymodels import LABELS, tiny_bert_classifier_dir, tiny_gpt2_dir  # noqa: E402,F401  (fixtures)

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "Kafka",
    "Streaming inference turns every request into exactly one result record, even after a crash.",
    "a b c",
]
PROMPTS = ["the quick fox", "kafka topics carry records between producers and consumers", "the tiny cat"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # two cores shared with other test suites: keep torch to one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def embed():
    return load_runner(default_model_path(), device="cpu")


@pytest.fixture(scope="module")
def gen(tiny_gpt2_dir):
    return load_runner(str(tiny_gpt2_dir), device="cpu")


@pytest.fixture
def gen_no_eos(tiny_gpt2_dir):
    """A fresh runner that never stops early, for tests about lengths."""
    r = load_runner(str(tiny_gpt2_dir), device="cpu")
    r.eos_token_ids = set()
    return r


@pytest.fixture(scope="module")
def clf(tiny_bert_classifier_dir):
    return load_runner(str(tiny_bert_classifier_dir), device="cpu")


def infer(runner, texts, params):
    if isinstance(params, P):
        params = [params] * len(texts)
    rows = [Row(ids, p) for ids, p in zip(runner.tokenize(texts), params)]
    prepared = runner.prepare(rows)
    raw = runner.run(prepared)
    return raw, runner.finish(raw, prepared)


def generated_ids(runner, texts, params) -> list[list[int]]:
    raw, outs = infer(runner, texts, params)
    return [row[: o["tokens"]] for row, o in zip(raw.tolist(), outs)]


# -- embed ---------------------------------------------------------------------------------
def test_embeddings_equal_sentence_transformers(embed):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(default_model_path(), device="cpu")
    want = st.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True)
    _, outs = infer(embed, TEXTS, P())
    got = torch.from_numpy(np.stack([o["vector"] for o in outs]))
    assert got.shape == (len(TEXTS), 384)
    torch.testing.assert_close(got, want.float().cpu(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)


def test_embeddings_batch_invariant(embed):
    alone = [infer(embed, [t], P())[1][0]["vector"] for t in TEXTS]
    together = [o["vector"] for o in infer(embed, TEXTS, P())[1]]
    torch.testing.assert_close(torch.from_numpy(np.stack(together)), torch.from_numpy(np.stack(alone)), atol=1e-5, rtol=0)


def test_encoder_pads_right_and_decoder_pads_left(embed, gen):
    short, long = embed.tokenize(["hi", "a much longer sentence here"])
    p = embed.prepare([Row(short, P()), Row(long, P())])
    assert p["input_ids"][0, : len(short)].tolist() == short
    assert p["attention_mask"][0].tolist() == [1] * len(short) + [0] * (len(long) - len(short))
    short, long = gen.tokenize(["the", "the quick red fox jumps"])
    p = gen.prepare([Row(short, P()), Row(long, P())])
    assert p["input_ids"][0, -len(short):].tolist() == short
    assert p["attention_mask"][0].tolist() == [0] * (len(long) - len(short)) + [1] * len(short)


def test_model_identity(embed, gen, tiny_gpt2_dir):
    weights = Path(default_model_path()) / "model.safetensors"
    assert embed.task == "EMBED" and embed.info.name == "all-MiniLM-L6-v2"
    assert embed.info.digest == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert embed.max_input_tokens == 256  # sentence_bert_config.json: the length it was trained for
    assert gen.info.name == tiny_gpt2_dir.name and gen.max_input_tokens == 64
    assert load_runner(str(tiny_gpt2_dir), name="tiny").info.name == "tiny"


# -- generate ------------------------------------------------------------------------------
def test_greedy_is_deterministic_and_batch_invariant(gen_no_eos):
    p = P(max_new_tokens=12)
    alone = [generated_ids(gen_no_eos, [t], p)[0] for t in PROMPTS]
    assert alone == [generated_ids(gen_no_eos, [t], p)[0] for t in PROMPTS]
    # the middle prompt is the longest: the others get left padding beside it
    assert generated_ids(gen_no_eos, PROMPTS, p) == alone
    assert generated_ids(gen_no_eos, PROMPTS[::-1], p) == alone[::-1]
    # guard against a degenerate model that would make the comparisons above vacuous
    assert all(len(set(ids)) > 2 for ids in alone) and len({tuple(a) for a in alone}) == 3


def test_per_row_max_new_tokens(gen_no_eos):
    _, outs = infer(gen_no_eos, PROMPTS, [P(max_new_tokens=n) for n in (1, 4, 9)])
    assert [o["tokens"] for o in outs] == [1, 4, 9]
    assert {o["finish_reason"] for o in outs} == {"length"}
    # a row cut short is a prefix of the same row given more room
    short = generated_ids(gen_no_eos, PROMPTS, [P(max_new_tokens=n) for n in (1, 4, 9)])
    full = generated_ids(gen_no_eos, PROMPTS, P(max_new_tokens=9))
    assert all(f[: len(s)] == s for s, f in zip(short, full))


def test_eos_stops_a_row(gen_no_eos):
    ids = generated_ids(gen_no_eos, PROMPTS[:1], P(max_new_tokens=10))[0]
    stop = ids[3]  # pretend the 4th generated token is the end of sequence
    first = ids.index(stop)
    gen_no_eos.eos_token_ids = {stop}
    raw, outs = infer(gen_no_eos, PROMPTS, P(max_new_tokens=10))
    assert outs[0]["finish_reason"] == "stop" and outs[0]["tokens"] == first + 1
    assert outs[0]["text"] == gen_no_eos.hf_tokenizer.decode(ids[:first], skip_special_tokens=True)
    assert raw[0, first].item() == stop


def test_generation_is_capped_by_the_model_positions(gen_no_eos):
    prompt = gen_no_eos.tokenize(["the quick fox jumps over the lazy dog number 1."])[0] * 20
    room = 4
    ids = prompt[: gen_no_eos.max_input_tokens - room]
    out = gen_no_eos.finish(gen_no_eos.run(p := gen_no_eos.prepare([Row(ids, P(max_new_tokens=10))])), p)[0]
    assert out["tokens"] == room and out["finish_reason"] == "length"
    with pytest.raises(InputTooLarge):
        gen_no_eos.prepare([Row(prompt[: gen_no_eos.max_input_tokens], P())])


def test_seeded_sampling_is_reproducible_and_batch_invariant(gen_no_eos):
    hot = P(max_new_tokens=10, temperature=5.0, seed=7)
    alone = generated_ids(gen_no_eos, [PROMPTS[0]], hot)[0]
    assert generated_ids(gen_no_eos, [PROMPTS[0]], hot)[0] == alone
    mixed = [hot, P(max_new_tokens=10, temperature=1.0, seed=1), P(max_new_tokens=3)]
    assert generated_ids(gen_no_eos, PROMPTS, mixed)[0] == alone
    assert generated_ids(gen_no_eos, PROMPTS[::-1], mixed[::-1])[2] == alone
    other_seed = generated_ids(gen_no_eos, [PROMPTS[0]], P(max_new_tokens=10, temperature=5.0, seed=8))[0]
    greedy = generated_ids(gen_no_eos, [PROMPTS[0]], P(max_new_tokens=10))[0]
    assert alone != other_seed and alone != greedy


def test_sampling_without_seed_varies_and_tiny_top_p_is_greedy(gen_no_eos):
    unseeded = P(max_new_tokens=10, temperature=5.0)
    assert generated_ids(gen_no_eos, [PROMPTS[0]], unseeded) != generated_ids(gen_no_eos, [PROMPTS[0]], unseeded)
    greedy = generated_ids(gen_no_eos, PROMPTS, P(max_new_tokens=10))
    nucleus = generated_ids(gen_no_eos, PROMPTS, P(max_new_tokens=10, temperature=5.0, top_p=1e-6, seed=3))
    assert nucleus == greedy  # only the top token survives top-p
    assert generated_ids(gen_no_eos, PROMPTS, P(max_new_tokens=10, temperature=0.0, seed=3)) == greedy


# -- classify ------------------------------------------------------------------------------
def test_classify_labels_and_scores(clf):
    _, outs = infer(clf, TEXTS, P())
    for o in outs:
        assert set(o["scores"]) == set(LABELS.values())
        assert sum(o["scores"].values()) == pytest.approx(1.0, abs=1e-6)
        assert o["label"] == max(o["scores"], key=o["scores"].get)
        assert o["score"] == o["scores"][o["label"]]
    alone = [infer(clf, [t], P())[1][0]["scores"] for t in TEXTS]
    for a, o in zip(alone, outs):
        assert a == pytest.approx(o["scores"], abs=1e-5)
    assert len({round(o["score"], 6) for o in outs}) > 1  # the inputs do reach the head


# -- loading -------------------------------------------------------------------------------
def test_task_is_inferred_from_the_config(embed, gen, clf):
    assert (embed.task, gen.task, clf.task) == ("EMBED", "GENERATE", "CLASSIFY")


@pytest.mark.parametrize(
    "which, task",
    [("minilm", "GENERATE"), ("minilm", "classify"), ("gpt2", "EMBED"), ("gpt2", "CLASSIFY"), ("bert", "GENERATE"), ("bert", "translate")],
)
def test_a_task_the_model_cannot_serve_is_refused(which, task, tiny_gpt2_dir, tiny_bert_classifier_dir):
    path = {"minilm": default_model_path(), "gpt2": str(tiny_gpt2_dir), "bert": str(tiny_bert_classifier_dir)}[which]
    with pytest.raises(ConfigError, match="cannot|task must be"):
        load_runner(path, task=task, device="cpu")


def test_explicit_task_that_fits_is_accepted(tiny_bert_classifier_dir):
    # a classifier checkpoint still holds an encoder that can embed
    r = load_runner(str(tiny_bert_classifier_dir), task="embed", device="cpu")
    assert r.task == "EMBED"
    assert len(infer(r, ["the quick fox"], P())[1][0]["vector"]) == 32


def test_unknown_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_runner(str(tmp_path / "nothing-here"))


# -- tokenize / cost / warmup ----------------------------------------------------------------
@pytest.mark.parametrize("which", ["embed", "gen"])
def test_tokenize_is_thread_safe(which, request):
    runner = request.getfixturevalue(which)
    batches = [TEXTS[i % len(TEXTS):] + PROMPTS[: i % 3 + 1] for i in range(64)]
    serial = [runner.tokenize(b) for b in batches]
    assert serial[0] == runner.hf_tokenizer(batches[0])["input_ids"]  # same ids as the model's own tokenizer
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            assert list(pool.map(runner.tokenize, batches)) == serial


def test_tokenize_does_not_truncate(embed):
    # MiniLM's tokenizer.json carries truncation at 128: the worker, not the tokenizer, decides
    ids = embed.tokenize(["word " * 300])[0]
    assert len(ids) == 302
    with pytest.raises(InputTooLarge):
        embed.prepare([Row(ids + ids, P())])


def test_cost(embed, gen):
    assert embed.cost([3, 5, 2], [P()] * 3) == 15
    assert embed.cost([7], [P()]) == 7
    assert gen.cost([3, 5], [P(max_new_tokens=4), P(max_new_tokens=10)]) == 2 * (5 + 10)
    assert gen.cost([3], [P()]) == 3 + gen.default_max_new_tokens

"""The decode stage's own contract (consumer/decoding.py `Decoder`), without a broker.

A chunk of Pending records goes in; the same list comes back, in order, each record either
carrying its validated request and its token ids (one list per input) or its typed error, whose
`reason` is the dead letter's. One bad record never changes what its neighbours become. The
runner is real (the tiny BERT classifier of tinymodels.py): its tokenizer counts the tokens.
tests/broker/test_hostile.py fuzzes decoding and sends a corpus through a worker; tests/unit/test_request.py
covers validation field by field. Here: what the Decoder itself decides and how it hands it on.
"""
from __future__ import annotations

import pytest

from inferlog.codec import DEADLETTER, REQUEST, Codec
from inferlog.consumer.decoding import Decoder
from inferlog.consumer.records import Pending
from inferlog.consumer.runners import load_runner
from inferlog.errors import (DecodeError, InputTooLarge, InvalidRequest, SchemaTypeError, TruncatedRecord,
                             UnknownFraming, UnknownModel, UnknownSchema, UnsupportedTask, WrongSchema)
from inferlog.request import Limits, build_request, now_ms
from tinymodels import tiny_bert_classifier_dir  # noqa: F401  (fixture)

CODEC = Codec()
MODEL = "tiny-bert"
LIMITS = Limits(max_inputs=3, max_input_bytes=200, max_new_tokens=16)
MAX_TOKENS = 16  # the setting; the tiny model itself takes 64


@pytest.fixture(scope="module")
def runner(tiny_bert_classifier_dir):
    return load_runner(str(tiny_bert_classifier_dir), device="cpu", name=MODEL)


@pytest.fixture
def decoder(runner):
    return Decoder(CODEC, runner, LIMITS, MAX_TOKENS, {MODEL})


def enc(rec: dict) -> bytes:
    return CODEC.encode(REQUEST, rec, trusted=True)  # trusted: the schema check would refuse the bad ones


def req(inputs=("the quick fox",), **over) -> dict:
    """A request record as a client may send it: built valid, then `over` set unchecked."""
    rec = build_request("classify", "the quick fox")
    rec.update(over, inputs=list(inputs))
    return rec


def pending(value: bytes | None, offset: int = 0) -> Pending:
    return Pending("inferlog.requests", 0, offset, 1, b"k", value, None, now_ms())


def words(n_tokens: int, runner) -> str:
    """A text the tiny tokenizer makes exactly `n_tokens` ids of ([CLS] and [SEP] included)."""
    text = " ".join(["the"] * (n_tokens - 2))
    assert len(runner.tokenize([text])[0]) == n_tokens
    return text


def assert_decoded(p: Pending, rec: dict, runner) -> None:
    assert p.error is None, p.error
    assert p.request.request_id == rec["request_id"] and p.request.inputs == rec["inputs"]
    assert p.ids == runner.tokenize(rec["inputs"])  # its own slice of the chunk's one tokenizer call


GOOD = enc(req())
# (case, value, the error's exact class, the dead letter's reason)
BAD = [
    ("tombstone", lambda r: None, DecodeError, "UNDECODABLE"),
    ("empty value", lambda r: b"", UnknownFraming, "UNDECODABLE"),
    ("unknown framing byte", lambda r: b"\x07" + GOOD[1:], UnknownFraming, "UNDECODABLE"),
    ("C3 not followed by 01", lambda r: b"\xc3\x02" + GOOD[2:], UnknownFraming, "UNDECODABLE"),
    ("truncated header", lambda r: GOOD[:6], TruncatedRecord, "UNDECODABLE"),
    ("truncated body", lambda r: GOOD[:-3], TruncatedRecord, "UNDECODABLE"),
    ("trailing bytes", lambda r: GOOD + b"\x00", SchemaTypeError, "UNDECODABLE"),
    ("invalid UTF-8 in an input", lambda r: GOOD.replace(b"quick", b"qu\xed\xa0\x80"), SchemaTypeError,
     "UNDECODABLE"),
    ("unknown fingerprint", lambda r: GOOD[:2] + bytes(8) + GOOD[10:], UnknownSchema, "UNKNOWN_SCHEMA"),
    ("Confluent framing, no registry", lambda r: b"\x00\x00\x00\x00\x07" + GOOD[10:], UnknownSchema,
     "UNKNOWN_SCHEMA"),
    ("valid Avro of another schema", lambda r: CODEC.encode(DEADLETTER, {
        "source": {"topic": "x", "partition": 0, "offset": 1}, "reason": "R", "detail": "d", "worker_id": "w",
        "failed_at": 0}), WrongSchema, "WRONG_SCHEMA"),
    ("empty request_id", lambda r: enc(req(request_id="")), InvalidRequest, "INVALID_REQUEST"),
    ("a blank input", lambda r: enc(req(inputs=["ok", "  "])), InvalidRequest, "INVALID_REQUEST"),
    ("max_new_tokens over the Decoder's limit", lambda r: enc(req(parameters={
        "max_new_tokens": LIMITS.max_new_tokens + 1, "temperature": None, "top_p": None, "seed": None})),
     InvalidRequest, "INVALID_REQUEST"),
    ("a task this runner does not serve", lambda r: enc(req(task="EMBED")), UnsupportedTask, "UNSUPPORTED_TASK"),
    ("a model not served here", lambda r: enc(req(model="another-model")), UnknownModel, "UNKNOWN_MODEL"),
    ("too many inputs", lambda r: enc(req(inputs=["a"] * (LIMITS.max_inputs + 1))), InputTooLarge,
     "INPUT_TOO_LARGE"),
    ("an input over max_input_bytes", lambda r: enc(req(inputs=["y" * (LIMITS.max_input_bytes + 1)])),
     InputTooLarge, "INPUT_TOO_LARGE"),
    ("an input over the token limit", lambda r: enc(req(inputs=["ok", words(MAX_TOKENS + 1, r)])), InputTooLarge,
     "INPUT_TOO_LARGE"),
]


def test_good_requests_are_decoded_in_place_in_order_with_their_token_ids(decoder, runner):
    """The chunk is returned itself, in its order; each record's ids are its own inputs' ids, one
    list per input, although the chunk is tokenized in one call (records of 1, 2 and 3 inputs)."""
    recs = [req(inputs=["the quick fox"]), req(inputs=["a red bird", "kafka topics carry records"]),
            req(inputs=["one", "the slow cat jumps", "streaming inference"], model=MODEL)]
    chunk = [pending(enc(r), offset=i) for i, r in enumerate(recs)]
    before = list(chunk)
    out = decoder(chunk)
    assert out is chunk and all(a is b for a, b in zip(out, before)) and len(out) == 3
    for p, rec in zip(out, recs):
        assert_decoded(p, rec, runner)
        assert p.request.task == "CLASSIFY" and p.request.model == rec["model"]


@pytest.mark.parametrize("case, value, err, reason", BAD, ids=[b[0] for b in BAD])
def test_a_bad_record_gets_its_typed_error_and_its_neighbours_are_answered(decoder, runner, case, value, err,
                                                                            reason):
    """Between two good records, the bad one carries exactly its error class, with the reason its
    dead letter will say and a detail; the good ones on either side decode as if it were not there."""
    before, after = req(inputs=["the lazy dog"]), req(inputs=["a tiny horse", "the happy cat"])
    chunk = [pending(enc(before), 0), pending(value(runner), 1), pending(enc(after), 2)]
    decoder(chunk)
    bad = chunk[1]
    assert type(bad.error) is err, f"{case}: {bad.error!r}"
    assert bad.error.reason == reason and bad.error.detail
    assert_decoded(chunk[0], before, runner)
    assert_decoded(chunk[2], after, runner)


def test_a_chunk_of_every_bad_kind_among_good_ones_keeps_each_outcome_in_place(decoder, runner):
    """One call over the whole corpus, each bad record followed by a good one: every record ends
    as it would alone, so the chunk's batched tokenization lines up with the right records."""
    chunk, expect = [], []
    for i, (case, value, err, reason) in enumerate(BAD):
        good = req(inputs=[f"kafka topics carry records {i}"] * (1 + i % 3))
        chunk += [pending(value(runner), 2 * i), pending(enc(good), 2 * i + 1)]
        expect += [(case, err, reason), good]
    decoder(chunk)
    for p, want in zip(chunk, expect):
        if isinstance(want, dict):
            assert_decoded(p, want, runner)
        else:
            case, err, reason = want
            assert type(p.error) is err and p.error.reason == reason, case


def test_a_record_that_decodes_but_does_not_validate_keeps_its_ids_for_the_dead_letter(decoder):
    """A record that is a request but an invalid one still names its request_id and tenant (the
    dead letter copies them); one that is not a request at all names nothing."""
    invalid = pending(enc(req(request_id="r-42", tenant="acme", inputs=[""])))
    undecodable = pending(b"\x07junk")
    decoder([invalid, undecodable])
    assert invalid.error.reason == "INVALID_REQUEST" and invalid.ids_hint == ("r-42", "acme")
    assert invalid.request is None
    assert undecodable.error.reason == "UNDECODABLE" and undecodable.ids_hint is None


@pytest.mark.parametrize("setting", [MAX_TOKENS, 1000])
def test_the_token_limit_is_the_smaller_of_the_setting_and_the_models(runner, setting):
    """Exactly the limit passes, one token more is INPUT_TOO_LARGE; a setting above what the
    model takes (64 positions) is capped at the model's."""
    limit = min(setting, runner.max_input_tokens)
    assert runner.max_input_tokens == 64
    decoder = Decoder(CODEC, runner, Limits(), setting, {MODEL})
    fits, over = req(inputs=[words(limit, runner)]), req(inputs=[words(limit + 1, runner)])
    chunk = [pending(enc(fits)), pending(enc(over), 1)]
    decoder(chunk)
    assert_decoded(chunk[0], fits, runner)
    assert type(chunk[1].error) is InputTooLarge and f"limit of {limit}" in chunk[1].error.detail


def test_the_model_check_is_off_without_names_and_a_null_model_is_always_served(runner):
    """With names (the live worker) a request naming another model is refused and one naming none
    or a served one is taken; without names (replay's any_model) every model name is taken."""
    recs = [req(model=None), req(model=MODEL), req(model="another-model")]
    strict = [pending(enc(r), i) for i, r in enumerate(recs)]
    Decoder(CODEC, runner, Limits(), MAX_TOKENS, {MODEL, "alias"})(strict)
    assert [p.error.reason if p.error else None for p in strict] == [None, None, "UNKNOWN_MODEL"]
    lax = [pending(enc(r), i) for i, r in enumerate(recs)]
    Decoder(CODEC, runner, Limits(), MAX_TOKENS, None)(lax)
    for p, rec in zip(lax, recs):
        assert_decoded(p, rec, runner)


class PoisonTokenizer:
    """The real runner, whose tokenizer raises on one text (as a tokenizer bug would): a fake
    for the failure path only; everything else is the real runner's."""

    POISON = "poison pill"

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def tokenize(self, texts):
        self.calls.append(list(texts))
        if self.POISON in texts:
            raise ValueError("the tokenizer broke")
        return self.runner.tokenize(texts)


def test_a_text_that_breaks_the_tokenizer_fails_its_record_alone(runner):
    """The chunk's one tokenizer call fails: it is redone record by record, the record whose text
    broke it is INVALID_REQUEST naming the failure, and every other record gets its own ids."""
    poison = PoisonTokenizer(runner)
    decoder = Decoder(CODEC, poison, LIMITS, MAX_TOKENS, {MODEL})
    recs = [req(inputs=["the quick fox", "a red bird"]), req(inputs=["ok", PoisonTokenizer.POISON]),
            req(inputs=["the slow cat"])]
    chunk = [pending(enc(r), i) for i, r in enumerate(recs)]
    decoder(chunk)
    assert type(chunk[1].error) is InvalidRequest and "ValueError: the tokenizer broke" in chunk[1].error.detail
    assert_decoded(chunk[0], recs[0], runner)
    assert_decoded(chunk[2], recs[2], runner)
    assert poison.calls[0] == [t for r in recs for t in r["inputs"]]  # one call for the chunk first
    assert poison.calls[1:] == [r["inputs"] for r in recs]  # then one per record

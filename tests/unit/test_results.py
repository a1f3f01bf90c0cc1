"""Result and dead-letter building: every output must fit in one Kafka record."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, strategies as st

from inferlog.codec import DEADLETTER, RESULT, SPLICE_MIN_FLOATS, Codec, encode_embeddings
from inferlog.consumer.records import BatchInfo, Pending
from inferlog.consumer.results import MAX_OUTPUT_BYTES, ResultBuilder
from inferlog.errors import InvalidRequest
from inferlog.request import Limits, build_request, validate_request
from inferlog.settings import load_settings

S = load_settings()
CODEC = Codec.from_settings(S)
BUILDER = ResultBuilder(CODEC, S, SimpleNamespace(name="m", revision=None, digest=None))


def pending(key=b"k", value=b"v", inputs=("a",)):
    p = Pending(S.tier_topic("normal"), 3, 42, 1, key, value, [("h", b"x")], 0)
    limits = Limits(max_inputs=1000)
    p.request = validate_request(build_request("embed", list(inputs), limits=limits), limits)
    return p


def test_a_result_too_large_for_a_record_becomes_a_small_dead_letter():
    p = pending(inputs=["x"] * 300)
    out = BUILDER.result(p, "OK", [{"vector": [0.5] * 1024}] * 300, BatchInfo.new(1, 1))
    assert out.dead and out.label == "OUTPUT_TOO_LARGE" and out.topic == S.model_deadletter_topic
    assert len(out.value) < MAX_OUTPUT_BYTES
    assert CODEC.decode(out.value, expect=DEADLETTER)["request_id"] == p.request.request_id


def test_a_normal_result_is_a_result():
    out = BUILDER.result(pending(), "OK", [{"vector": [0.1] * 384}], BatchInfo.new(1, 1))
    assert not out.dead and out.topic == S.model_results_topic and out.label == "OK"


@pytest.mark.parametrize("task, outputs", [
    ("embed", [{"vector": [0.25, -1.5, 3.0]}, {"vector": [0.5] * 384}]),
    ("generate", [{"text": "héllo ✓", "tokens": 3, "finish_reason": "length"}]),
    ("classify", [{"label": "POS", "score": 0.75, "scores": {"POS": 0.75, "NEG": 0.25}}]),
])
def test_a_result_encodes_its_outputs_as_the_union_branch_of_its_task(task, outputs):
    """The builder names each output's union branch (a fastavro shortcut): the bytes must be those
    of the plain record, with the outputs read back as given and of the task's own type."""
    p = pending(inputs=["a"] * len(outputs))
    p.request.task = task.upper()
    out = BUILDER.result(p, "OK", outputs, BatchInfo.new(1, 1))
    rec = CODEC.decode(out.value, expect=RESULT)
    assert rec["outputs"] == outputs and rec["task"] == task.upper()
    assert CODEC.encode(RESULT, rec) == out.value  # validated, branch found by fastavro: same bytes


FLOAT32 = st.floats(width=32, allow_nan=False)  # NaN's payload bits may differ; its test is below


def result_record(vectors) -> dict:
    rec = CODEC.decode(BUILDER.result(pending(), "OK", [], BatchInfo.new(1, 1)).value, expect=RESULT)
    return {**rec, "outputs": [{"vector": list(v)} for v in vectors]}


@given(vectors=st.lists(st.lists(FLOAT32, max_size=40), max_size=4), as_array=st.booleans())
def test_embeddings_written_as_float32_blocks_are_the_bytes_fastavro_writes(vectors, as_array):
    rec = result_record(vectors)
    outputs = [{"vector": np.asarray(v, dtype=np.float32) if as_array else v} for v in vectors]
    blocks = encode_embeddings(outputs, BUILDER.embedding_branch)
    spliced = CODEC.encode_spliced(RESULT, rec, "outputs", blocks)
    assert spliced == CODEC.encode(RESULT, rec)  # fastavro, validated
    assert [o["vector"] for o in CODEC.decode(spliced, expect=RESULT)["outputs"]] == vectors


@pytest.mark.parametrize("dim", [1, SPLICE_MIN_FLOATS - 1, SPLICE_MIN_FLOATS, 384])
def test_the_builder_writes_short_and_long_embeddings_alike(dim):
    """Short vectors go through fastavro alone, long ones as blocks: the same bytes either way."""
    vector = np.linspace(-1, 1, dim, dtype=np.float32)
    out = BUILDER.result(pending(), "OK", [{"vector": vector}], BatchInfo.new(1, 1))
    rec = CODEC.decode(out.value, expect=RESULT)
    assert rec["outputs"] == [{"vector": vector.tolist()}]
    assert CODEC.encode(RESULT, rec) == out.value


def test_a_nan_in_an_embedding_reads_back_as_nan():
    vector = np.ones(SPLICE_MIN_FLOATS, dtype=np.float32)
    vector[0] = np.nan
    out = BUILDER.result(pending(), "OK", [{"vector": vector}], BatchInfo.new(1, 1))
    v = CODEC.decode(out.value, expect=RESULT)["outputs"][0]["vector"]
    assert np.isnan(v[0]) and v[1:] == [1.0] * (SPLICE_MIN_FLOATS - 1)


@pytest.mark.parametrize("outputs", [
    [{"vector": [[0.5, 1.0]] * SPLICE_MIN_FLOATS}],     # 2-D
    [{"vector": ["x"] * SPLICE_MIN_FLOATS}],            # not floats
    [{"vector": [0.5] * SPLICE_MIN_FLOATS, "extra": 1}],  # not the Embedding record
    [{"text": "hi"}],                                   # another branch's record
])
def test_outputs_that_are_no_plain_embedding_go_to_fastavro_which_refuses_them(outputs):
    assert encode_embeddings(outputs, b"\x00") is None
    with pytest.raises(InvalidRequest):
        BUILDER.result(pending(), "OK", outputs, BatchInfo.new(1, 1))


def test_a_dead_letter_near_the_size_limit_leaves_key_and_value_at_the_source():
    p = pending(key=b"K" * 100_000, value=b"V" * 850_000)  # each under 1 MB, together over
    out = BUILDER.dead_letter(p, InvalidRequest("bad"))
    assert len(out.value) + len(out.key or b"") < 1_000_000
    dl = CODEC.decode(out.value, expect=DEADLETTER)
    assert dl["value"] is None and dl["key"] is None and "not carried" in dl["detail"]
    assert dl["source"] == {"topic": S.tier_topic("normal"), "partition": 3, "offset": 42}


def test_a_small_dead_letter_carries_the_original():
    dl = CODEC.decode(BUILDER.dead_letter(pending(), InvalidRequest("bad")).value, expect=DEADLETTER)
    assert (dl["key"], dl["value"], dl["headers"], dl["reason"]) == (b"k", b"v", {"h": b"x"}, "INVALID_REQUEST")


def test_an_aborted_replay_transaction_is_a_resumable_error():
    """The replay's topic sink turns an aborted transaction into a ReplayError naming --resume."""
    from inferlog.consumer.emit import CommitAborted
    from inferlog.replay.checkpoint import ReplayError
    from inferlog.replay.sinks import TopicSink

    class Aborting:
        def commit(self, outputs, commits, group_metadata=None):
            raise CommitAborted("coordinator moved")

    sink = TopicSink.__new__(TopicSink)  # no broker needed: only the error mapping is under test
    sink.emitter, sink.ck, sink.tally = Aborting(), SimpleNamespace(run_id="run-7"), None
    with pytest.raises(ReplayError, match="--resume run-7"):
        sink.commit([], {("t", 0): 1})

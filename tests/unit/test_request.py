"""Request validation, shared by producers (refuse before sending) and workers (dead-letter)."""
import math

import pytest
from hypothesis import given, strategies as st

from inferlog.errors import InputTooLarge, InvalidRequest, RecordError
from inferlog.request import Limits, build_request, validate_request


def test_a_good_request_round_trips_through_validation():
    rec = build_request("generate", ["a", "b"], parameters={"max_new_tokens": 5, "temperature": 0.5, "seed": 3},
                        tenant="acme", priority=2, deadline_ms=123, metadata={"k": "v"})
    req = validate_request(rec)
    assert (req.task, req.inputs, req.tenant, req.priority, req.deadline) == ("GENERATE", ["a", "b"], "acme", 2, 123)
    assert req.parameters.max_new_tokens == 5 and req.parameters.seed == 3


@pytest.mark.parametrize("kw, err", [
    (dict(task="dance"), InvalidRequest),
    (dict(inputs=[]), InvalidRequest),
    (dict(inputs=[""]), InvalidRequest),
    (dict(inputs=[" \n"]), InvalidRequest),
    (dict(inputs=["x"] * 65), InputTooLarge),
    (dict(inputs=["x" * 70_000]), InputTooLarge),
    (dict(parameters={"temperature": math.nan}), InvalidRequest),
    (dict(parameters={"temperature": -1}), InvalidRequest),
    (dict(parameters={"top_p": 0}), InvalidRequest),
    (dict(parameters={"max_new_tokens": 0}), InvalidRequest),
    (dict(parameters={"max_new_tokens": 10_000}), InvalidRequest),
    (dict(parameters={"seed": -1}), InvalidRequest),
    (dict(parameters={"tempreature": 1}), InvalidRequest),
    (dict(priority=10**6), InvalidRequest),
    (dict(deadline_ms="soon"), InvalidRequest),
    (dict(metadata={"a": 1}), InvalidRequest),
    (dict(request_id="x" * 200), InvalidRequest),
])
def test_bad_requests_are_refused_with_a_typed_reason(kw, err):
    args = {"task": "embed", "inputs": ["fine"], **kw}
    with pytest.raises(err) as e:
        build_request(args.pop("task"), args.pop("inputs"), **args)
    assert e.value.reason in ("INVALID_REQUEST", "INPUT_TOO_LARGE") and str(e.value)


def test_limits_are_configurable():
    with pytest.raises(InputTooLarge):
        build_request("embed", ["a", "b", "c"], limits=Limits(max_inputs=2))
    assert build_request("embed", ["a", "b"], limits=Limits(max_inputs=2))


@given(st.dictionaries(st.sampled_from(["request_id", "task", "inputs", "parameters", "created_at", "priority",
                                        "deadline", "metadata", "tenant", "model"]),
                       st.one_of(st.none(), st.integers(), st.floats(), st.text(), st.lists(st.text()),
                                 st.dictionaries(st.text(), st.one_of(st.text(), st.integers())))))
def test_validation_only_ever_raises_record_errors(rec):
    try:
        validate_request(rec)
    except RecordError:
        pass


def test_the_request_keywords_are_declared_once_and_shown_everywhere():
    """RequestOptions is the one declaration: help() and inspect show each keyword with its
    default on build_request and on every SDK call, and a misspelt one is a TypeError."""
    import inspect

    from inferlog.producer.aio import AsyncProducer
    from inferlog.producer.sync import Producer
    from inferlog.request import REQUEST_DEFAULTS

    for fn in (build_request, Producer.submit, Producer.infer, AsyncProducer.submit, AsyncProducer.infer):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in REQUEST_DEFAULTS} == REQUEST_DEFAULTS, fn.__qualname__
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert inspect.iscoroutinefunction(AsyncProducer.submit)
    with pytest.raises(TypeError, match="'tenat'"):
        build_request("embed", ["x"], tenat="acme")

"""The model stages on their own: fake runners that fail on chosen requests; no broker, no model.

A batch that fails in any stage is split down to its culprit, which alone becomes a dead
letter; an out-of-memory error splits without dead-lettering anyone; a broken device stops
the worker rather than dead-letter innocent requests; a closed engine abandons its work
quietly. Every request of a batch is answered exactly once.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Empty, SimpleQueue
from types import SimpleNamespace

import pytest

from inferlog.codec import DEADLETTER, REQUEST, RESULT, Codec
from inferlog.consumer.engine import Engine
from inferlog.consumer.pipeline import InlineExecutor, Pipeline
from inferlog.consumer.runners import Row
from inferlog.consumer.records import Out, Pending
from inferlog.consumer.results import ResultBuilder
from inferlog.errors import FatalError
from inferlog.request import Limits, build_request, now_ms, validate_request
from inferlog.settings import load_settings

S = load_settings()
CODEC = Codec.from_settings(S)
TIMEOUT = 10.0  # generous: a slow, shared machine must never make these fail, only a hang


def bench_module(name: str):
    """A module of bench/ by its path: bench/ holds scripts, it is no package on sys.path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[2] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EchoRunner = bench_module("echo_runner").EchoRunner  # the bench's runner with no model: faults subclass it


class OutOfMemoryError(RuntimeError):
    """Named as torch.cuda's is: the pipeline knows an OOM by its class name."""


def tokens(offset: int) -> int:
    """Each request's inputs have their own length, so an echoed output names its request
    (the echo runner keeps only lengths from prepare on)."""
    return offset + 2


class Faulty(EchoRunner):
    """The echo runner, raising in `stage` for every batch that holds a poisoned request."""

    def __init__(self, stage: str = "run", poisoned: tuple[int, ...] = (), error=lambda: ValueError("bad input")):
        super().__init__()
        self.stage, self.error = stage, error
        self.poison = {tokens(o) for o in poisoned}
        self.ran: list[int] = []  # sizes (in rows) of the batches that ran; only the device thread appends

    def fails(self, stage: str, lengths: list[int]) -> bool:
        return stage == self.stage and bool(self.poison & set(lengths))

    def prepare(self, rows: list[Row]) -> list[int]:
        prepared = super().prepare(rows)
        if self.fails("prepare", prepared):
            raise self.error()
        return prepared

    def run(self, prepared: list[int]) -> list[int]:
        if self.fails("run", prepared):
            raise self.error()
        self.ran.append(len(prepared))
        return super().run(prepared)

    def finish(self, raw: list[int], prepared) -> list[dict]:
        if self.fails("finish", raw):
            raise self.error()
        return super().finish(raw, prepared)


class OutOfMemory(EchoRunner):
    """A device that fits at most `fits` rows at a time."""

    def __init__(self, fits: int = 2):
        super().__init__()
        self.fits = fits
        self.ran: list[int] = []

    def run(self, prepared: list[int]) -> list[int]:
        if len(prepared) > self.fits:
            raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(prepared)} rows")
        self.ran.append(len(prepared))
        return prepared


class Gated(EchoRunner):
    """run() waits for `gate`: a batch stays on the device while the test closes the engine."""

    def __init__(self):
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def run(self, prepared: list[int]) -> list[int]:
        self.entered.set()
        self.gate.wait(TIMEOUT)
        return prepared


def pending(offset: int, inputs: int = 1) -> Pending:
    """A decoded request at `offset` with `inputs` inputs of tokens(offset) ids each."""
    p = Pending(S.tier_topic('normal'), 0, offset, 1, f"k{offset}".encode(), b"v", None, now_ms())
    p.request = validate_request(build_request("embed", [f"text {offset}"] * inputs), Limits())
    p.ids = [[1] * tokens(offset)] * inputs
    return p


def batch(n: int) -> list[Pending]:
    return [pending(o, inputs=1 + o % 2) for o in range(n)]  # some with two inputs: outputs are sliced


@pytest.fixture(params=["threads", "inline"])
def make_pipeline(request):
    """Pipelines with the stages on a pool and a device loop, or all on the caller's thread."""
    made: list[tuple[Pipeline, object]] = []
    inline = request.param == "inline"

    def make(runner) -> Pipeline:
        cpu = InlineExecutor() if inline else ThreadPoolExecutor(2, "test-cpu")
        pipe = Pipeline(runner, cpu, ResultBuilder(CODEC, S, runner.info), SimpleQueue(), Row, inline=inline)
        made.append((pipe, cpu))
        return pipe

    make.inline = inline
    yield make
    for pipe, cpu in made:
        pipe.close()
        cpu.shutdown(wait=True, cancel_futures=True)
        if pipe.device is not None:
            pipe.device.join(TIMEOUT)


def answers(pipe: Pipeline, expected: int) -> dict[int, list[Out]]:
    """Every output delivered, by request offset: read until `expected` outputs came and no job
    is left in flight, then once more, so a late or duplicate answer would show."""
    got: dict[int, list[Out]] = defaultdict(list)
    deadline = time.monotonic() + TIMEOUT
    while sum(map(len, got.values())) < expected or pipe.in_flight:
        if time.monotonic() > deadline:
            raise AssertionError(f"{dict(got)} answered of {expected}, {pipe.in_flight} jobs still in flight")
        try:
            done = pipe.done.get(timeout=0.05)
        except Empty:
            continue
        for p, outs in done:
            got[p.offset].extend(outs)
    while not pipe.done.empty():
        for p, outs in pipe.done.get():
            got[p.offset].extend(outs)
    return dict(got)


def assert_answered(got: dict[int, list[Out]], sent: list[Pending], dead: set[int],
                    reason: str = "MODEL_ERROR") -> None:
    """Each request sent has exactly one output: a dead letter with `reason` for those in `dead`,
    for the others an OK result holding its own echoes (not a batch-mate's)."""
    assert sorted(got) == [p.offset for p in sent]
    assert all(len(outs) == 1 for outs in got.values()), {o: len(v) for o, v in got.items() if len(v) != 1}
    assert {o for o, (out,) in got.items() if out.dead} == dead
    for p in sent:
        offset, (out,) = p.offset, got[p.offset]
        if out.dead:
            assert out.label == reason
            dl = CODEC.decode(out.value, expect=DEADLETTER)
            assert (dl["reason"], dl["source"]["offset"], dl["key"]) == (reason, offset, f"k{offset}".encode())
        else:
            rec = CODEC.decode(out.value, expect=RESULT)
            assert rec["status"] == "OK"
            assert rec["outputs"] == [{"vector": [float(len(ids))]} for ids in p.ids]


# -- a failure is split down to its culprit ---------------------------------------------------
@pytest.mark.parametrize("stage", ["prepare", "run", "finish"])
def test_a_failing_request_alone_becomes_a_dead_letter(make_pipeline, stage):
    """Whatever stage raises, its batch-mates are answered and only the culprit is dead-lettered."""
    pipe = make_pipeline(Faulty(stage, poisoned=(5,)))
    sent = batch(8)
    pipe.submit(sent)
    got = answers(pipe, 8)
    assert_answered(got, sent, dead={5})
    assert "ValueError: bad input" in CODEC.decode(got[5][0].value, expect=DEADLETTER)["detail"]


def test_two_culprits_in_one_batch_are_both_isolated(make_pipeline):
    pipe = make_pipeline(Faulty("run", poisoned=(1, 6)))
    sent = batch(8)
    pipe.submit(sent)
    assert_answered(answers(pipe, 8), sent, dead={1, 6})


def test_a_record_error_from_the_runner_keeps_its_reason(make_pipeline):
    """The echo runner's own length check (an InputTooLarge in prepare) names the dead letter,
    not a generic MODEL_ERROR."""
    pipe = make_pipeline(EchoRunner(max_input_tokens=tokens(4)))  # requests 5..7 are too long
    sent = batch(8)
    pipe.submit(sent)
    assert_answered(answers(pipe, 8), sent, dead={5, 6, 7}, reason="INPUT_TOO_LARGE")


def test_out_of_memory_splits_until_the_batch_fits_and_dead_letters_nobody(make_pipeline):
    runner = OutOfMemory(fits=2)
    pipe = make_pipeline(runner)
    sent = [pending(o) for o in range(8)]  # one row each: a batch of 2 requests fits
    pipe.submit(sent)
    got = answers(pipe, 8)
    assert_answered(got, sent, dead=set())
    assert sorted(runner.ran) == [2, 2, 2, 2]  # split in halves, not down to single requests
    assert {CODEC.decode(out.value, expect=RESULT)["batch"]["size"] for (out,) in got.values()} == {2}


# -- a broken device stops the worker ------------------------------------------------------
def cuda_error() -> RuntimeError:
    return RuntimeError("CUDA error: device-side assert triggered")


def test_a_broken_device_is_fatal_and_dead_letters_nobody(make_pipeline):
    pipe = make_pipeline(Faulty("run", poisoned=(3,), error=cuda_error))
    pipe.submit(batch(8))
    deadline = time.monotonic() + TIMEOUT
    while pipe.fatal is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "CUDA error" in str(pipe.fatal)
    assert pipe.done.empty()  # not split: the batch's requests are left for a healthy worker


def message(offset: int, text: str) -> SimpleNamespace:
    """What the engine reads of a confluent Message."""
    value = CODEC.encode(REQUEST, build_request("embed", text))
    return SimpleNamespace(topic=lambda: "t", partition=lambda: 0, offset=lambda: offset, key=lambda: None,
                           value=lambda: value, headers=lambda: None)


def test_the_engine_raises_fatal_from_step_and_dead_letters_nobody():
    """The worker and replay stop on the FatalError that step() raises."""
    poison = "a poisoned request with many words in it"
    runner = Faulty("run", error=cuda_error)
    runner.poison = {poison.count(" ") + 2}  # the echo tokenizer's length of it
    engine = Engine(S, runner)
    try:
        engine.assign(("t", 0))
        engine.accept([message(o, poison if o == 3 else f"fine {o}") for o in range(8)])
        deadline = time.monotonic() + TIMEOUT
        with pytest.raises(FatalError, match="CUDA error"):
            while time.monotonic() < deadline:
                engine.step(flush=True)
                time.sleep(0.01)
        engine.collect()
        outputs, _ = engine.release()
        assert engine.counts["dead_letters"] == 0 and not any(o.dead for o in outputs)
        assert engine.pending > 0  # the poisoned record stays uncommitted, to be redone elsewhere
    finally:
        engine.close()


# -- closing -----------------------------------------------------------------------------
def test_a_closed_engine_abandons_its_work_quietly(caplog):
    """close() promises that work still in flight is abandoned, not dead-lettered: a batch the
    device finishes after close, a batch queued for the device behind it and a batch submitted
    after close all end without an output, an error logged or a hang, and the device loop ends."""
    runner = Gated()
    engine = Engine(S, runner)
    pipe = engine.pipeline
    caplog.set_level(logging.ERROR)
    try:
        pipe.submit([pending(0), pending(1)])
        assert runner.entered.wait(TIMEOUT)  # on the device, held at the gate
        pipe.submit([pending(2)])  # prepared, then queued behind it on the device
        deadline = time.monotonic() + TIMEOUT
        while pipe.ready.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pipe.ready.empty()  # so close has a batch queued for the device to abandon
        engine.close()
        runner.gate.set()  # the device batch ends after close; its finish cannot be scheduled
        pipe.submit([pending(3)])  # the pools are shut down
    finally:
        runner.gate.set()
        engine.cpu.shutdown(wait=True)
        pipe.device.join(TIMEOUT)
    assert not pipe.device.is_alive()
    assert pipe.done.empty()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# -- what adaptive batching reads of the device ------------------------------------------------
@pytest.mark.parametrize("stage", [None, "prepare", "run"])
def test_the_device_is_free_once_every_job_is_past_it(make_pipeline, stage):
    """device_free is False from submit until the job ran (or failed before or on the device,
    split halves included), and each batch run reports its rows and device time."""
    gated = stage is None and not make_pipeline.inline  # inline, submit returns with the job done
    runner = Gated() if gated else Faulty(stage or "run", poisoned=() if stage is None else (2,))
    pipe = make_pipeline(runner)
    assert pipe.device_free
    sent = batch(4)
    pipe.submit(sent)
    if gated:  # (a failing job may be through all its halves before a check here)
        assert not pipe.device_free
        assert runner.entered.wait(TIMEOUT)
        assert not pipe.device_free  # running
        runner.gate.set()
    got = answers(pipe, 4)
    assert_answered(got, sent, dead=set() if stage is None else {2})
    assert pipe.device_free
    costs = []
    while not pipe.costs.empty():
        costs.append(pipe.costs.get())
    rows = sum(len(p.ids) for p in sent)
    if stage is None:
        assert [r for r, _ in costs] == [rows] and costs[0][1] > 0
    else:  # only the batches that ran report a cost: never the culprit's
        assert 0 < sum(r for r, _ in costs) < rows

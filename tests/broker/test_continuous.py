"""Continuous batching for generate (consumer/continuous.py, on transformers'
ContinuousBatchingManager): the engine alone with the tiny GPT-2, then real workers on a real
broker with a revocation in the middle of generation."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from inferlog.codec import REQUEST, RESULT, Codec
from inferlog.consumer.engine import Engine
from inferlog.consumer.runners import Row, load_runner
from inferlog.producer.sync import Producer
from inferlog.request import Parameters, build_request
from inferlog.settings import Settings
from support import account, output_count, running_worker, wait_until
from tinymodels import tiny_gpt2_dir  # noqa: F401  (fixture)

S = Settings(bootstrap_servers="unused:9092", max_wait_ms=5)
CODEC = Codec.from_settings(S)
PROMPTS = ["the quick red fox", "kafka topics carry", "the slow cat", "a worker batches requests"]


@pytest.fixture(scope="module")
def gen(tiny_gpt2_dir):
    return load_runner(str(tiny_gpt2_dir), device="cpu")


def message(offset: int, text: str, max_new_tokens: int, partition: int = 0, **params):
    value = CODEC.encode(REQUEST, build_request("generate", text, parameters={"max_new_tokens": max_new_tokens,
                                                                              **params}))
    return SimpleNamespace(topic=lambda: "t", partition=lambda: partition, offset=lambda: offset,
                           key=lambda: None, value=lambda: value, headers=lambda: None)


def alone(runner, text: str, n: int) -> dict:
    rows = [Row(ids, Parameters(max_new_tokens=n)) for ids in runner.tokenize([text])]
    prepared = runner.prepare(rows)
    return runner.finish(runner.run(prepared), prepared)[0]


def drain(engine: Engine, n: int, timeout: float = 60) -> list[dict]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} outputs"
        engine.wait(0.005)
        time.sleep(0.002)  # as the worker's fetch does: a loop that never lets go of the GIL starves generation
        engine.step()
        outs, _ = engine.release()
        got += [CODEC.decode(o.value, expect="inferlog.DeadLetter" if o.dead else RESULT) | {"dead": o.dead}
                for o in outs]
    return got


def test_rows_leave_the_running_batch_as_they_finish(gen):
    """Short and long generations admitted together: each is answered when its own row ends (the
    short ones long before the long ones), every text is the greedy text the model gives it alone."""
    engine = Engine(S.with_overrides(max_batch_size=8), gen)
    try:
        assert engine.continuous
        engine.assign(("t", 0))
        lengths = [2, 40, 3, 40, 2, 40, 4, 40]
        engine.accept([message(i, PROMPTS[i % 4], n) for i, n in enumerate(lengths)])
        got = {r["source"]["offset"]: r for r in drain(engine, len(lengths))}  # released in offset order
        assert len({r["batch"]["batch_id"] for r in got.values()}) == 1  # admitted together
        done = {i: got[i]["timings"]["completed_at"] for i in got}
        short, long = [i for i, n in enumerate(lengths) if n <= 4], [i for i, n in enumerate(lengths) if n > 4]
        # each finished when its own row ended: every short one before any long one (a static
        # batch finishes all of its rows at once)
        assert max(done[i] for i in short) < min(done[i] for i in long), done
        for i, n in enumerate(lengths):
            want = alone(gen, PROMPTS[i % 4], n)
            assert got[i]["outputs"][0] == want, (i, got[i]["outputs"][0], want)
    finally:
        engine.close()


def test_the_kv_budget_admits_what_fits_and_dead_letters_what_never_can(gen):
    """max_batch_tokens is the cache: requests wait in the queue while it is full, and one that
    needs more than all of it is a dead letter (INPUT_TOO_LARGE) without stopping the others."""
    s = S.with_overrides(max_batch_size=8, max_batch_tokens=48)
    engine = Engine(s, gen)
    try:
        engine.assign(("t", 0))
        # each ~5 prompt + 20 new = ~25 cache tokens: one runs at a time in 48; the last needs 5 + 60
        msgs = [message(i, PROMPTS[i % 4], 20) for i in range(4)] + [message(4, PROMPTS[0], 60)]
        engine.accept(msgs)
        seen_rows = []
        got = []
        deadline = time.monotonic() + 60
        while len(got) < 5:
            assert time.monotonic() < deadline
            engine.wait(0.005)
            time.sleep(0.002)
            engine.step()
            seen_rows.append(engine.pipeline._rows)
            outs, _ = engine.release()
            got += outs
        assert max(seen_rows) == 1  # the cache held one such request at a time
        dead = [o for o in got if o.dead]
        assert len(dead) == 1
        rec = CODEC.decode(dead[0].value, expect="inferlog.DeadLetter")
        assert rec["reason"] == "INPUT_TOO_LARGE" and "KV cache" in rec["detail"]
        assert rec["source"]["offset"] == 4
    finally:
        engine.close()


def test_a_revoked_partition_leaves_the_batch_and_its_results_are_dropped(gen):
    engine = Engine(S.with_overrides(max_batch_size=8), gen)
    try:
        engine.assign(("t", 0))
        engine.assign(("t", 1))
        engine.accept([message(i, PROMPTS[i % 4], 40, partition=i % 2) for i in range(6)])
        deadline = time.monotonic() + 30
        while engine.pipeline.in_flight < 6:  # decoded on the pool, then admitted
            assert time.monotonic() < deadline
            engine.step()
            time.sleep(0.002)
        dropped = engine.revoke({("t", 1)})
        assert dropped == 3 and engine.pipeline.cancelled == 3 and engine.pipeline.in_flight == 3
        got = drain(engine, 3)
        assert {r["source"]["partition"] for r in got} == {0}
        time.sleep(0.3)
        engine.step()
        assert engine.release()[0] == [] and engine.pipeline.has_room()
    finally:
        engine.close()


def test_sampling_parameters_reach_the_rows(gen):
    """temperature and top_p are per row: a hot row wanders from the greedy text, a greedy row
    next to it in the same batch does not."""
    engine = Engine(S, gen)
    try:
        engine.assign(("t", 0))
        engine.accept([message(0, PROMPTS[0], 30), message(1, PROMPTS[0], 30, temperature=2.0, top_p=1.0)])
        got = {r["source"]["offset"]: r["outputs"][0]["text"] for r in drain(engine, 2)}
        want = alone(gen, PROMPTS[0], 30)["text"]
        assert got[0] == want and got[1] != want
    finally:
        engine.close()


# -- real workers, real broker ----------------------------------------------------------------
def test_a_revocation_mid_generation_loses_and_duplicates_nothing(broker_settings, tiny_gpt2_dir):
    """A worker generating rows of 4 and 40 tokens; a second joins and takes partitions with work
    in the first's engine: that work is dropped there (running rows cancelled) and redone by the
    new owner, once. In every batch admitted together the short rows left before the long ones."""
    texts = [f"{PROMPTS[i % 4]} {i % 9}" for i in range(1200)]
    lengths = [4 if i % 2 else 40 for i in range(len(texts))]
    with Producer(broker_settings) as p:
        ids = [p.submit("generate", t, parameters={"max_new_tokens": n}, key=str(i))
               for i, (t, n) in enumerate(zip(texts, lengths))]
    # room for all of them: every partition holds work in the first's engine when the second joins
    s = broker_settings.with_overrides(max_batch_size=16, max_in_flight=2048)
    first, second = load_runner(str(tiny_gpt2_dir), device="cpu"), load_runner(str(tiny_gpt2_dir), device="cpu")
    dropped: list[int] = []
    with running_worker(s, first) as a:
        revoke = a.engine.revoke  # observed, not replaced: what each revocation took from the engine
        a.engine.revoke = lambda tps: dropped.append(revoke(tps)) or dropped[-1]
        # Until the join, the first answers at most ~20 requests a second (a sleep per finished
        # request, device time that costs no CPU): on a loaded machine the second worker took
        # longer to warm up and join than the first needed for all 1,200, and the join found
        # nothing left to take (CI, stop 32).
        output = first.output
        first.output = lambda tokens, n: (None if dropped else time.sleep(0.05)) or output(tokens, n)
        wait_until(lambda: output_count(s) >= 20, timeout=120, what="the first results")
        # all fetched: whichever partitions the join takes, they have work in flight here (with
        # 512 in flight, a loaded machine once fetched unevenly and the join took idle ones)
        wait_until(lambda: a.engine.pending + output_count(s) >= len(ids), timeout=120, what="everything fetched")
        with running_worker(s.with_overrides(worker_id=f"{s.worker_id}-b"), second):
            wait_until(lambda: output_count(s) >= len(ids), timeout=300, every=0.5, what="all generations")
        cancelled = a.engine.pipeline.cancelled
    acc = account(s)
    acc.assert_exactly_once()
    assert len(acc.results) == len(ids) and not acc.dead_letters
    assert {r["worker_id"] for r in acc.results} == {s.worker_id, f"{s.worker_id}-b"}
    # the join took partitions with work in flight: queued requests, and running rows when the
    # running batch held some of them (the engine test above cancels running rows for certain)
    assert dropped and dropped[0] > 0, f"the join dropped nothing in flight ({dropped}; {cancelled} rows cancelled)"
    want = {(t, n): alone(first, t, n)["text"] for t, n in set(zip(texts, lengths))}
    asked = {rid: (t, n) for rid, t, n in zip(ids, texts, lengths)}
    groups: dict[tuple, dict[int, list[float]]] = {}
    for r in acc.results:
        assert r["outputs"][0]["text"] == want[asked[r["request_id"]]]
        made = r["outputs"][0]["tokens"]  # what it generated: an end-of-sequence token ends a row early
        kind = "short" if made <= 4 else "long" if made >= 30 else None
        done = r["timings"]["completed_at"]
        if kind:
            groups.setdefault((r["worker_id"], r["batch"]["batch_id"]), {}).setdefault(kind, []).append(
                done.timestamp() if hasattr(done, "timestamp") else done / 1000)
    mixed = [g for g in groups.values() if len(g) == 2]
    assert mixed, "no batch admitted rows of both lengths together"
    bad = [(sorted(g["short"]), sorted(g["long"])) for g in mixed if not max(g["short"]) < min(g["long"])]
    assert not bad, f"a short row waited for a long one: {bad[:3]} of {len(mixed)}"


POISON = "the loud horse jumps over the happy dog number 7."


def break_on(runner, prompt: str) -> None:
    """The model raises in any step that prefills `prompt` (three of its tokens in a row: only its
    prefill holds them): a fault in the model, as FaultyRunner injects in the static stages."""
    marker, forward = runner.tokenize([prompt])[0][1:4], runner.model.forward

    def faulty_forward(*a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        flat = ids.reshape(-1).tolist() if ids is not None else []
        if any(flat[i:i + 3] == marker for i in range(len(flat) - 2)):
            raise RuntimeError("injected: this prompt breaks the model")
        return forward(*a, **kw)

    runner.model.forward = faulty_forward


def test_a_request_that_breaks_the_model_is_isolated_and_its_batch_mates_answered(tiny_gpt2_dir):
    """A model error ends the manager's loop and every row running with it: the pipeline starts
    a new one, runs each failed request again alone, and only the one that fails alone becomes a
    dead letter (MODEL_ERROR); the others get the text they give alone."""
    runner = load_runner(str(tiny_gpt2_dir), device="cpu")
    forward = runner.model.forward
    engine = Engine(S.with_overrides(max_batch_size=8), runner)
    try:
        break_on(runner, POISON)
        engine.assign(("t", 0))
        texts = [PROMPTS[i % 4] for i in range(6)]
        texts.insert(3, POISON)
        engine.accept([message(i, t, 12) for i, t in enumerate(texts)])
        got = {r["source"]["offset"]: r for r in drain(engine, len(texts), timeout=120)}
        assert engine.pipeline.restarts >= 2  # the batch's crash, then the poison alone
        assert got[3]["dead"] and got[3]["reason"] == "MODEL_ERROR" and "injected" in got[3]["detail"]
        runner.model.forward = forward
        for i, t in enumerate(texts):
            if i != 3:
                assert not got[i]["dead"] and got[i]["outputs"][0] == alone(runner, t, 12), i
        # and the batch fills again afterwards
        engine.accept([message(len(texts) + i, PROMPTS[i], 6) for i in range(4)])
        later = drain(engine, 4, timeout=120)
        assert all(not r["dead"] for r in later) and len({r["batch"]["batch_id"] for r in later}) <= 2
    finally:
        runner.model.forward = forward
        engine.close()


def test_the_users_mode_steady_stream_both_tiers_a_joining_worker_and_hostile_clients(broker_settings, tiny_gpt2_dir):
    """Continuous batching as users run it: a steady stream on both tiers to a worker that already
    serves, a second worker joining mid-stream, and among the requests garbage, a request the
    cache can never hold, one too long for the model, one that breaks the model and one with
    the largest and strangest headers. Every offset of both topics ends as exactly one result
    or one dead letter with its reason."""
    from confluent_kafka import Producer as KafkaProducer

    from inferlog.clients import confluent_config

    s = broker_settings.with_overrides(max_batch_size=8, max_batch_tokens=60, max_in_flight=64)
    runners = [load_runner(str(tiny_gpt2_dir), device="cpu") for _ in range(2)]
    for r in runners:
        break_on(r, POISON)
    codec = Codec.from_settings(s)
    raw = KafkaProducer(confluent_config(s, **{"enable.idempotence": True}))
    hostile = [  # (topic, value, headers, what it must end as)
        (s.tier_topic("normal"), b"\x17 not avro at all", None, "UNDECODABLE"),
        (s.tier_topic("high"), b"", None, "UNDECODABLE"),
        (s.tier_topic("normal"), CODEC.encode(REQUEST, build_request("generate", PROMPTS[0], parameters={
            "max_new_tokens": 58})), None, "INPUT_TOO_LARGE"),  # ~5 + 58 cache tokens > 60
        (s.tier_topic("high"), CODEC.encode(REQUEST, build_request("generate", "word " * 200)), None,
         "INPUT_TOO_LARGE"),  # more tokens than the model's 64 positions
        (s.tier_topic("normal"), CODEC.encode(REQUEST, build_request("generate", POISON, parameters={
            "max_new_tokens": 8})), None, "MODEL_ERROR"),
        (s.tier_topic("high"), CODEC.encode(REQUEST, build_request("generate", PROMPTS[1], parameters={
            "max_new_tokens": 8}, metadata={"k" * 200: "v" * 4000})),
         [("traceparent", b"\xff" * 4096), ("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
          ("x-junk", b"\x00" * 65536), ("", b"")], "OK"),
    ]
    stop, sent = threading.Event(), []

    def stream():  # ~25 requests/s, every third on the high tier, until stopped
        with Producer(s) as p:
            i = 0
            while not stop.is_set():
                high = i % 3 == 0
                sent.append(p.submit("generate", f"{PROMPTS[i % 4]} {i}", parameters={"max_new_tokens": 4 + i % 9},
                                     priority=s.high_priority if high else 0))
                if i == 20:  # the hostile ones in the middle of the stream
                    for topic, value, headers, _ in hostile:
                        raw.produce(topic, value, headers=headers)
                    assert raw.flush(30) == 0
                i += 1
                time.sleep(0.04)

    t = threading.Thread(target=stream, daemon=True)
    with running_worker(s, runners[0]):
        t.start()
        wait_until(lambda: output_count(s) >= 30, timeout=120, what="the first worker serving")
        with running_worker(s.with_overrides(worker_id=f"{s.worker_id}-b"), runners[1]):
            wait_until(lambda: output_count(s) >= 120, timeout=180, every=0.5, what="both serving")
            stop.set()
            t.join(30)
            total = len(sent) + len(hostile)
            wait_until(lambda: output_count(s) >= total, timeout=180, every=0.5, what="every request answered")
    acc = account(s, codec)
    acc.assert_exactly_once()
    assert len(acc.requests) == total
    reasons = acc.reasons()
    assert reasons == {"UNDECODABLE": 2, "INPUT_TOO_LARGE": 2, "MODEL_ERROR": 1}, reasons
    assert len(acc.results) == total - 5 and all(r["status"] == "OK" for r in acc.results)
    by_tier = {r["source"]["topic"] for r in acc.results}
    assert by_tier == {s.tier_topic("normal"), s.tier_topic("high")}
    assert {r["worker_id"] for r in acc.results} == {s.worker_id, f"{s.worker_id}-b"}

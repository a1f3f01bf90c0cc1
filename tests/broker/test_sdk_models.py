"""The SDKs' and `inferlog produce`'s model check against the real broker (issue 26, item 3): a
worker's real `Announcer` keeps its record on the models topic; a request naming a model nobody
serves (on the topics the producer sends that model's requests to) raises UnknownModel (a task
its model does not do, UnsupportedTask) and nothing reaches any request topic; a request naming
no model is not checked and starts no directory. The rule is the gateway's
(inferlog/registry.py refuse_unserved).
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from click.testing import CliRunner

from inferlog.codec import REQUEST, Codec
from inferlog.errors import UnknownModel, UnsupportedTask
from inferlog.producer.aio import AsyncProducer
from inferlog.producer.cli import produce
from inferlog.producer.sync import Producer
from inferlog.registry import Announcer, Member
from inferlog.settings import default_model_path
from inferlog.topics import ensure_topics, request_topics
from support import read_all

NAME = "tiny-embedder"
FILES = "/models/tiny-embedder"  # where its files are: no name of the model (its topics are its name's)


def member(s, topics: list[str] | None = None) -> Member:
    now = int(time.time() * 1000)
    return Member(name=NAME, worker_id=s.worker_id, task="embed", revision=None, digest=None, limits={},
                  chat_template=None, model=FILES, topics=topics if topics is not None else list(s.model_topics(NAME)),
                  group=s.worker_group, host="test", started_at=now, heartbeat_at=now, announce_interval_s=30.0)


@pytest.fixture
def announced(broker_settings):
    """broker_settings, with NAME (embed) announced by a worker reading its request topics (made
    here, as that worker would make them)."""
    ensure_topics(broker_settings, list(broker_settings.model_topics(NAME)))
    a = Announcer(broker_settings, member(broker_settings)).start()
    assert a.delivered == 1
    yield broker_settings
    a.stop()


def published(s) -> list[dict]:
    """The requests on every model's topics."""
    codec = Codec.from_settings(s)
    return [codec.decode(r.value, expect=REQUEST) for t in request_topics(s) for r in read_all(s, t)]


def test_the_sync_sdk_refuses_a_model_nobody_serves_and_publishes_nothing(announced):
    s = announced
    with Producer(s) as p:
        t0 = time.monotonic()
        with pytest.raises(UnknownModel) as e:
            p.submit("embed", "x", model="no-such-model")
        assert e.value.reason == "UNKNOWN_MODEL" and "no-such-model" in e.value.detail and NAME in e.value.detail
        with pytest.raises(UnsupportedTask) as e:  # it embeds, it does not generate
            p.submit("generate", "x", model=NAME)
        assert e.value.reason == "UNSUPPORTED_TASK"
        with pytest.raises(UnknownModel) as e:  # one refused: none of the batch is sent
            p.submit_many([{"task": "embed", "inputs": ["a"], "model": NAME},
                           {"task": "embed", "inputs": ["b"], "model": "no-such-model"}])
        assert e.value.detail.startswith("requests[1]: ")
        with pytest.raises(UnknownModel):  # at once, not after its timeout
            p.infer("embed", "x", model="no-such-model", timeout=60)
        assert time.monotonic() - t0 < 20
        with pytest.raises(UnknownModel):  # its files name no topics of it
            p.submit("embed", "by files", model=FILES)
        ok = [p.submit("embed", "by name", model=NAME), *p.submit_many([{"task": "embed", "inputs": ["many"],
                                                                         "model": NAME}])]
        p.flush()
        directory = p.models.directory
        assert directory is not None and directory.ready
    assert p.models.directory is None and not directory._thread.is_alive()  # close() stopped it
    assert sorted(r["request_id"] for r in published(s)) == sorted(ok)


def test_a_worker_on_other_topics_does_not_count(broker_settings):
    """As at the gateway: only members reading this producer's request topics serve its requests."""
    s = broker_settings
    a = Announcer(s, member(s, topics=[f"{s.tier_topic('normal')}.other"])).start()
    try:
        with Producer(s) as p, pytest.raises(UnknownModel):
            p.submit("embed", "x", model=NAME)
    finally:
        a.stop()
    assert published(s) == []


def test_a_request_without_a_model_starts_no_directory_and_the_opt_out_checks_nothing(announced):
    s = announced
    with Producer(s) as p:
        plain = p.submit("embed", "no model named")
        p.flush()
        assert p.models.directory is None
    # a caller publishing before its workers start: their topics made first
    # (`inferlog kafka topics --model not-served-yet`), the requests wait there for them
    ensure_topics(s, list(s.model_topics("not-served-yet")))
    with Producer(s, check_models=False) as p:
        early = p.submit("embed", "x", model="not-served-yet")
        p.flush()
        assert p.models.directory is None
    assert sorted(r["request_id"] for r in published(s)) == sorted([plain, early])


def test_the_async_sdk_refuses_a_model_nobody_serves(announced):
    s = announced

    async def main() -> list[str]:
        async with AsyncProducer(s) as p:
            with pytest.raises(UnknownModel):
                await p.submit("embed", "x", model="no-such-model")
            with pytest.raises(UnsupportedTask):
                await p.submit_many([{"task": "classify", "inputs": ["x"], "model": NAME}])
            ok = [await p.submit("embed", "x", model=NAME, acked=True)]
            assert p.models.directory is not None
        return ok

    ok = asyncio.run(main())
    assert [r["request_id"] for r in published(s)] == ok


def test_produce_reports_a_line_for_a_model_nobody_serves_and_publishes_the_others(announced, tmp_path):
    s = announced
    flags = ["--bootstrap-servers", s.bootstrap_servers, "--topic", s.requests_topic,
             "--high-priority-topic", s.high_priority_topic, "--models-topic", s.models_topic]
    lines = [{"text": "no model"}, {"inputs": ["served"], "model": NAME},
             {"inputs": ["nobody serves it"], "model": "no-such-model"},
             {"task": "generate", "inputs": ["not its task"], "model": NAME}]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = CliRunner().invoke(produce, [str(f), *flags])
    assert res.exit_code == 1, res.output
    assert f"sent 2 requests (1 to {s.tier_topic('normal')}, 1 to {s.tier_topic('normal', NAME)})" in res.output
    assert "invalid: 2 line(s)" in res.output
    assert "line 3: UNKNOWN_MODEL: model 'no-such-model' is not served" in res.output
    assert "line 4: UNSUPPORTED_TASK:" in res.output
    assert sorted(r["inputs"][0] for r in published(s)) == ["no model", "served"]

    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in [
        {"custom_id": "b-1", "method": "POST", "url": "/v1/embeddings", "body": {"model": NAME, "input": "in"}},
        {"custom_id": "b-2", "method": "POST", "url": "/v1/embeddings", "body": {"model": "gone", "input": "out"}},
    ]))
    res = CliRunner().invoke(produce, [str(batch), "--format", "openai-batch", "--tokenizer", default_model_path(),
                                       *flags])
    assert res.exit_code == 1, res.output
    assert "line 2: UNKNOWN_MODEL: model 'gone'" in res.output and "sent 1 requests" in res.output
    assert [r.key for r in read_all(s, s.tier_topic("normal", NAME)) if r.key and r.key.startswith(b"b-")] == [b"b-1"]

    # --no-check-models: published as written, for the workers that start later (their topics made first)
    ensure_topics(s, list(s.model_topics("no-such-model")))
    res = CliRunner().invoke(produce, [str(f), "--no-check-models", *flags])
    assert res.exit_code == 0, res.output
    assert "sent 4 requests (" in res.output
    for n, model in ((1, None), (2, NAME), (1, "no-such-model")):
        assert f"{n} to {s.tier_topic('normal', model)}" in res.output, res.output

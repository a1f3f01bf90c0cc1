"""The model registry against the real broker (inferlog/registry.py): real workers (a tiny BERT
classifier) announce what they serve, the gateway lists it through the official `openai` client,
a clean stop withdraws it at once, a fatal one leaves it to expire, and a request for a model
nobody serves is refused before anything reaches the request topics. tests/unit/test_registry_offline.py:
the aggregation and expiry on a fake clock."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from inferlog.codec import REQUEST, Codec
from inferlog.consumer.runners import load_runner
from inferlog.consumer.worker import Worker
from inferlog.errors import FatalError
from inferlog.producer.gateway import serve_in_thread
from inferlog.registry import EXPIRY_INTERVALS, ModelDirectory
from inferlog.topics import ensure_topics
from support import read_all, running_worker, wait_until
from tinymodels import tiny_bert_classifier_dir  # noqa: F401  (fixture)

NAME = "tiny-cls"


@pytest.fixture(scope="module")
def classifier(tiny_bert_classifier_dir):
    return load_runner(str(tiny_bert_classifier_dir), device="cpu")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="open-gateway", max_retries=0, timeout=30)


def ids(c: openai.OpenAI) -> list[str]:
    return [m.id for m in c.models.list().data]


def members(d: ModelDirectory) -> list[str]:
    live = d.live().get(NAME)
    return [m.worker_id for m in live.members] if live else []


@pytest.fixture
def settings(broker_settings, tiny_bert_classifier_dir):
    """The test's topics, the classifier's files as the model, served as NAME."""
    return broker_settings.with_overrides(model=str(tiny_bert_classifier_dir), model_name=NAME, max_wait_ms=5)


@pytest.fixture
def directory(settings):
    d = ModelDirectory(settings).start()
    yield d
    d.stop()


def test_a_serving_worker_is_listed_and_its_clean_stop_withdraws_it_at_once(settings, classifier):
    # an interval of a minute: what removes the record within seconds is the tombstone, not expiry
    s = settings.with_overrides(announce_interval_s=60)
    with serve_in_thread(s) as url:  # the gateway first: it tails the registry
        c = client(url)
        assert ids(c) == []
        started = time.time()
        with running_worker(s, classifier):
            wait_until(lambda: ids(c) == [NAME], timeout=30, what="the worker's model in /v1/models")
            m = c.models.retrieve(NAME)
            assert (m.id, m.object, m.owned_by) == (NAME, "model", "inferlog")
            assert started - 1 <= m.created <= time.time()
            assert (m.model_extra["task"], m.model_extra["members"]) == ("classify", 1)
        t0 = time.monotonic()
        wait_until(lambda: ids(c) == [], timeout=20, every=0.1, what="the model withdrawn")
        assert time.monotonic() - t0 < EXPIRY_INTERVALS * s.announce_interval_s
        with pytest.raises(openai.NotFoundError) as e:
            c.models.retrieve(NAME)
        assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    # the tombstone is on the topic: a reader that starts now finds the model gone, not expiring
    d = ModelDirectory(s).start()
    try:
        assert d.wait_ready(30) and d.registry.members == {} and d.read >= 2
    finally:
        d.stop()


def test_a_model_nobody_serves_is_refused_at_once_and_nothing_is_published(settings, classifier):
    s = settings.with_overrides(gateway_max_wait_s=30)
    with running_worker(s, classifier), serve_in_thread(s) as url, httpx.Client(base_url=url, timeout=30) as h:
        c = client(url)
        wait_until(lambda: ids(c) == [NAME], timeout=30, what="the worker's model in /v1/models")
        t0 = time.monotonic()
        with pytest.raises(openai.NotFoundError) as e:
            c.embeddings.create(model="no-such-model", input="x")
        assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as e:  # a classifier makes no embeddings
            c.embeddings.create(model=NAME, input="x")
        assert e.value.code == "unsupported_task" and "UNSUPPORTED_TASK" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:  # nor chat: refused for its task, whatever its template
            c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
        assert e.value.code == "unsupported_task"
        r = h.post("/v1/requests", json={"task": "classify", "inputs": "x", "model": "no-such-model"})
        assert r.status_code == 404 and r.json()["detail"]["reason"] == "UNKNOWN_MODEL", r.text
        assert r.json()["detail"]["code"] == "model_not_found"
        r = h.post("/v1/requests", json={"task": "generate", "inputs": "x", "model": NAME})
        assert r.status_code == 400 and r.json()["detail"]["reason"] == "UNSUPPORTED_TASK", r.text
        refused_in = time.monotonic() - t0
        # a gateway on other request topics reaches none of this worker's: nothing is listed there
        elsewhere = s.with_overrides(requests_topic=f"{s.requests_topic}-other",
                                     high_priority_topic=f"{s.high_priority_topic}-other")
        with serve_in_thread(elsewhere) as other_url:
            assert ids(client(other_url)) == []
            with pytest.raises(openai.NotFoundError):
                client(other_url).embeddings.create(model=NAME, input="x")
        # its files are no name of it: requests for a name go to that name's topics, where no worker is
        r = h.post("/v1/requests", json={"task": "classify", "inputs": "x", "model": s.model})
        assert r.status_code == 404 and f"served: {NAME}" in r.json()["detail"]["detail"], r.text
        # what it serves goes through, named by its served name, or by no name at all (the gateway's model)
        done = [h.post("/v1/requests", params={"wait": 20}, json={"task": "classify", "inputs": "fine", **named})
                for named in ({"model": NAME}, {})]
        assert [r.status_code for r in done] == [200, 200], [r.text for r in done]
        assert {r.json()["status"] for r in done} == {"done"}
    assert refused_in < 10, f"five refusals took {refused_in:.1f}s"  # no waiting for an answer that never comes
    codec = Codec.from_settings(s)
    published = [codec.decode(r.value, expect=REQUEST) for t in s.request_topics for r in read_all(s, t)]
    assert sorted(p["request_id"] for p in published) == sorted(r.json()["request_id"] for r in done)


def test_a_second_worker_of_the_same_model_is_a_second_member(settings, classifier, directory):
    s, second = settings, settings.with_overrides(worker_id=f"{settings.worker_id}-b")
    with running_worker(s, classifier):
        wait_until(lambda: members(directory) == [s.worker_id], timeout=30, what="the first member")
        with running_worker(second, classifier), serve_in_thread(s) as url:
            model = directory.live()[NAME]
            assert [m.worker_id for m in model.members] == [s.worker_id, second.worker_id]  # oldest first
            assert {(m.task, m.group, tuple(m.topics), m.digest) for m in model.members} == {
                ("classify", s.worker_group, tuple(s.request_topics), classifier.info.digest)}
            assert classifier.info.digest and all(m.model == s.model for m in model.members)
            assert client(url).models.retrieve(NAME).model_extra["members"] == 2
        wait_until(lambda: members(directory) == [s.worker_id], timeout=20, what="the second member withdrawn")
    wait_until(lambda: directory.live() == {}, timeout=20, what="the model withdrawn")


def test_a_worker_that_stops_on_a_fatal_error_leaves_its_record_to_expire(settings, classifier, directory):
    s = settings.with_overrides(announce_interval_s=1.0)
    ensure_topics(s, list(s.request_topics))  # as `inferlog worker` makes them
    w = Worker(s, classifier)
    step, deadline = w._step, time.monotonic() + 90

    def turn():  # it serves, and is listed meanwhile; then it fails as a fenced worker does
        step()
        if w.ready.is_set() and NAME in directory.live():
            raise FatalError("fenced (injected)")
        if time.monotonic() > deadline:
            raise AssertionError(f"not listed while serving (assigned: {w.ready.is_set()})")

    w._step = turn
    assert w.run() == FatalError.exit_code
    # no tombstone: the record stays on the topic, and the model is gone once 3 of its 1 s intervals passed
    wait_until(lambda: NAME not in directory.live(), timeout=15, every=0.1, what="the record to expire")
    key = f"{NAME}/{s.worker_id}"
    assert list(directory.registry.members) == [key]  # expired, not removed
    member = directory.registry.members[key]
    assert member.announce_interval_s == 1.0 and time.time() * 1000 >= member.expires_at

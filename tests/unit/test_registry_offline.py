"""The model registry's pure part (inferlog/registry.py) on a fake clock, no broker: records in,
live models out; heartbeats expire after 3 of their member's own intervals; tombstones remove;
the check a gateway makes before publishing. The Announcer against a fake producer: its first
record, its heartbeats, a tombstone only on a clean stop. tests/broker/test_registry.py runs
workers and the gateway against the real broker."""
from __future__ import annotations

import json
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest

from inferlog.errors import UnknownModel, UnsupportedTask
from inferlog.registry import (EXPIRY_INTERVALS, Announcer, Member, ModelDirectory, Registry, announcement,
                               refuse_unserved, request_directory)
from inferlog.settings import Settings

T0 = 1_800_000_000_000  # epoch ms


def member(name="m", worker="w0", task="embed", at=T0, interval=10.0, started=T0, topics=("r.high", "r"),
           **kw) -> Member:
    return Member(name=name, worker_id=worker, task=task, revision=None, digest="abc", limits={"max_inputs": 64},
                  chat_template=None, model=f"/models/{name}", topics=list(topics), group="g", host="h",
                  started_at=started, heartbeat_at=at, announce_interval_s=interval, **kw)


def put(reg, m: Member) -> None:
    reg.apply(m.key.encode(), m.to_json())


def test_a_model_is_live_while_one_member_is_fresh():
    reg = Registry()
    put(reg, member(worker="w0", at=T0))
    put(reg, member(worker="w1", at=T0 + 20_000, started=T0 + 5_000))
    live = reg.live(T0 + 1000)
    assert list(live) == ["m"] and [x.worker_id for x in live["m"].members] == ["w0", "w1"]
    assert live["m"].created == T0 // 1000  # its oldest live member's start
    # w0's heartbeat is 3 intervals old: gone; w1 holds the model up
    expiry = EXPIRY_INTERVALS * 10_000
    assert [x.worker_id for x in reg.live(T0 + expiry)["m"].members] == ["w1"]
    assert reg.live(T0 + expiry - 1)["m"].members[0].worker_id == "w0"
    assert reg.live(T0 + 20_000 + expiry) == {}  # both expired: the model is not served


def test_expiry_follows_each_members_own_interval():
    reg = Registry()
    put(reg, member(worker="slow", interval=60.0))
    put(reg, member(name="other", worker="fast", interval=1.0))
    assert set(reg.live(T0 + 2_999)) == {"m", "other"}
    assert set(reg.live(T0 + 3_000)) == {"m"}
    assert set(reg.live(T0 + 179_999)) == {"m"} and reg.live(T0 + 180_000) == {}


def test_a_heartbeat_renews_and_a_tombstone_removes_at_once():
    reg = Registry()
    m = member()
    put(reg, m)
    put(reg, replace(m, heartbeat_at=T0 + 25_000))
    assert "m" in reg.live(T0 + 50_000)  # renewed: 25 s old of 30
    reg.apply(m.key.encode(), None)
    assert reg.live(T0 + 25_001) == {} and reg.members == {}


def test_records_that_are_no_announcement_are_skipped_not_fatal():
    reg = Registry()
    for value in (b"not json", b"[1, 2]", json.dumps({"format": 99, "name": "x"}).encode(),
                  json.dumps({**json.loads(member().to_json()), "task": "translate"}).encode(),
                  json.dumps({**json.loads(member().to_json()), "heartbeat_at": "yesterday"}).encode()):
        reg.apply(b"k", value)
    assert reg.skipped == 5 and reg.members == {}
    # a later format's extra fields are ignored, what this reader knows is kept
    reg.apply(b"k", json.dumps({**json.loads(member().to_json()), "gpu_memory": 80}).encode())
    assert list(reg.live(T0)) == ["m"]


def test_the_check_before_publishing():
    reg = Registry()
    put(reg, member(name="minilm", task="embed"))
    put(reg, member(name="gpt", worker="w1", task="generate"))
    assert reg.check("minilm", "embed", T0).name == "minilm"
    assert reg.check("/models/minilm", "EMBED", T0).name == "minilm"  # by its files, as the worker answers
    assert reg.check("gpt", None, T0).name == "gpt"
    assert reg.check("gpt", "translate", T0).name == "gpt"  # not a task: request validation says so
    with pytest.raises(UnknownModel, match="'nope' is not served by any worker \\(served: gpt, minilm\\)"):
        reg.check("nope", "embed", T0)
    with pytest.raises(UnsupportedTask, match="'minilm' serves embed, not generate"):
        reg.check("minilm", "generate", T0)
    with pytest.raises(UnknownModel):  # expired is not served
        reg.check("gpt", "generate", T0 + 30_000)


def test_only_the_members_a_publishers_requests_reach_count():
    """Requests are routed by model: a member counts when it reads the topics that requests naming
    it are published to, in the publisher's layout."""
    s = Settings(requests_topic="r", high_priority_topic="r.high")
    assert s.model_topics("minilm") == ("r.high.minilm", "r.minilm")
    reg = Registry()
    put(reg, member(name="minilm", worker="a", topics=list(s.model_topics("minilm"))))
    put(reg, member(name="gpt", worker="b"))  # a shared-layout worker: reads r.high and r
    assert set(reg.live(T0)) == {"minilm", "gpt"}
    assert set(reg.live(T0, s.model_topics)) == {"minilm"}
    assert set(reg.live(T0, s.with_overrides(topic_layout="shared").model_topics)) == {"gpt"}
    with pytest.raises(UnknownModel, match="served: minilm"):
        reg.check("gpt", "generate", T0, s.model_topics)
    d = request_directory(s, clock=lambda: T0)
    for m in reg.members.values():
        d.apply(m.key, m.to_json())
    assert list(d.live()) == ["minilm"] and d.find("gpt") is None
    # by its files only where a request naming them reaches it: the shared layout's one pair
    assert d.find("/models/minilm") is None
    shared = request_directory(s.with_overrides(topic_layout="shared"), clock=lambda: T0)
    for m in reg.members.values():
        shared.apply(m.key, m.to_json())
    assert shared.find("/models/gpt").name == "gpt"


def test_openai_shape_of_a_live_model():
    reg = Registry()
    put(reg, member(worker="a", started=T0 + 1_000))
    put(reg, member(worker="b", started=T0 + 9_000, at=T0 + 9_000))
    assert reg.live(T0 + 10_000)["m"].openai() == {"id": "m", "object": "model", "created": (T0 + 1_000) // 1000,
                                                    "owned_by": "inferlog", "task": "embed", "members": 2}


def test_the_directory_answers_on_its_clock_before_and_after_records():
    now = [T0]
    d = ModelDirectory(Settings(), clock=lambda: now[0])
    assert not d.ready and d.live() == {}
    m = member()
    d.apply(m.key.encode(), m.to_json())
    assert list(d.live()) == ["m"] and d.find("m").name == "m" and d.read == 1
    now[0] += EXPIRY_INTERVALS * 10_000
    assert d.live() == {} and d.find("m") is None


def test_publishers_refuse_only_a_named_model_and_only_once_the_registry_is_read():
    """refuse_unserved: the gateway's, the SDKs' and `inferlog produce`'s one rule."""
    s = Settings(requests_topic="r", high_priority_topic="r.high", topic_layout="shared")
    d = request_directory(s, clock=lambda: T0)
    assert d.routes("m") == ("r.high", "r")
    refuse_unserved(d, "no-such-model", "embed")  # not read yet: nothing is refused
    m = member()
    d.apply(m.key.encode(), m.to_json())
    d._ready.set()
    refuse_unserved(d, None, "generate")  # no model named: never checked
    refuse_unserved(d, "m", "embed")
    refuse_unserved(d, "/models/m", "EMBED")  # by its files (one topic pair); the task in either case
    with pytest.raises(UnknownModel):
        refuse_unserved(d, "no-such-model", "embed")
    with pytest.raises(UnsupportedTask):
        refuse_unserved(d, "m", "generate")


# -- the announcer, against a fake producer -----------------------------------------------------
class FakeProducer:
    def __init__(self, deliver: bool = True):
        self.deliver, self.sent, self.pending = deliver, [], []
        self.purged = False

    def produce(self, topic, value, key, on_delivery):
        self.sent.append((topic, key, value))
        self.pending.append(on_delivery)

    def poll(self, _timeout=0):
        while self.pending:
            cb = self.pending.pop(0)
            cb(None if self.deliver else SimpleNamespace(str=lambda: "UNKNOWN_TOPIC_OR_PART"), None)
        return 0

    def flush(self, _timeout=0):
        self.poll()
        return 0

    def purge(self):
        self.purged = True


def announcer(deliver=True, interval=0.05, clock=None):
    s = Settings(models_topic="reg", announce_interval_s=interval, worker_id="w7")
    p = FakeProducer(deliver)
    return Announcer(s, member(worker="w7", interval=interval), producer=p, clock=clock), p


def test_the_announcer_announces_at_start_beats_and_withdraws_on_a_clean_stop():
    a, p = announcer()
    a.start()
    assert [(t, k) for t, k, _ in p.sent] == [("reg", b"m/w7")] and a.delivered == 1
    beats = threading.Event()
    orig = p.produce
    p.produce = lambda *x, **kw: (orig(*x, **kw), len(p.sent) >= 3 and beats.set())
    assert beats.wait(5), "no heartbeats"
    a.stop(tombstone=True)
    assert p.sent[-1] == ("reg", b"m/w7", None) and p.purged
    beats_then = [json.loads(v)["heartbeat_at"] for _, _, v in p.sent[:-1]]
    assert beats_then == sorted(beats_then)


def test_a_fatal_stop_leaves_the_record_to_expire():
    a, p = announcer()
    a.start()
    a.stop(tombstone=False)
    assert all(v is not None for _, _, v in p.sent) and p.purged


def test_nothing_delivered_means_no_tombstone_and_one_warning(caplog):
    a, p = announcer(deliver=False, interval=0.02)
    with caplog.at_level("WARNING", logger="inferlog.registry"):
        a.start()
        threading.Event().wait(0.2)  # several failed heartbeats
        a.stop(tombstone=True)
    assert a.delivered == 0 and all(v is not None for _, _, v in p.sent)
    warned = [r for r in caplog.records if "cannot announce" in r.getMessage()]
    assert len(warned) == 1 and "UNKNOWN_TOPIC_OR_PART" in warned[0].getMessage()


def test_what_a_worker_announces(tiny_runner_info):
    s = Settings(model="/srv/gpt", model_name="my-gpt", worker_id="w1", group_id="g", max_input_tokens=4096,
                 requests_topic="r", high_priority_topic="r.high")
    m = announcement(s, tiny_runner_info)
    assert (m.name, m.task, m.worker_id, m.model) == ("my-gpt", "generate", "w1", "/srv/gpt")
    assert m.topics == ["r.high.my-gpt", "r.my-gpt"] and m.group == "g.my-gpt" and m.key == "my-gpt/w1"
    assert (m.revision, m.digest, m.chat_template) == ("rev1", "d1g", "{{ messages }}")
    assert m.limits["max_input_tokens"] == 1024  # the model's own limit is the smaller
    assert m.limits["max_new_tokens_limit"] == s.max_new_tokens_limit
    assert m.heartbeat_at == m.started_at and m.announce_interval_s == s.announce_interval_s
    assert Member.from_json(m.to_json()) == m
    unnamed = announcement(Settings(worker_id="w1"), tiny_runner_info)
    assert unnamed.name == "info-name"  # no served name set: the runner's


@pytest.fixture
def tiny_runner_info():
    return SimpleNamespace(info=SimpleNamespace(name="info-name", revision="rev1", digest="d1g"), task="GENERATE",
                           max_input_tokens=1024, hf_tokenizer=SimpleNamespace(chat_template="{{ messages }}"),
                           device="cpu")

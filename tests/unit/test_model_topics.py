"""A model's name -> its topics and group (inferlog/settings.py): the rule every publisher,
worker, audit and the chart share."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from inferlog.errors import ConfigError
from inferlog.settings import DEFAULT_NAME, Settings, default_model_path, served_name_of, topic_segment

S = Settings(requests_topic="r", high_priority_topic="r.high", group_id="g")
TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")  # what Kafka accepts


def test_a_plain_name_is_its_own_part():
    assert topic_segment("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert S.model_topics("chat") == ("r.high.chat", "r.chat") and S.tier_topic("high", "chat") == "r.high.chat"
    assert S.with_overrides(model_name="chat").worker_group == "g.chat"
    assert Settings().request_topics == (f"inferlog.requests.high.{DEFAULT_NAME}", f"inferlog.requests.{DEFAULT_NAME}")


@given(st.text(min_size=1, max_size=300))
def test_any_name_gives_legal_dot_free_parts(name):
    seg = topic_segment(name)
    assert "." not in seg and TOPIC.match(f"inferlog.requests.high.{seg}")
    assert seg == topic_segment(name)  # the same everywhere, every time


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_two_names_never_share_topics(a, b):
    if a != b:
        assert topic_segment(a) != topic_segment(b)


def test_names_that_differ_only_in_replaced_characters_stay_apart():
    assert len({topic_segment(n) for n in ("org/model", "org.model", "org_model", "org model")}) == 4


def test_each_topic_says_its_tier_and_whether_it_is_a_request_topic():
    for name in ("chat", "high", "Qwen/Qwen2.5-0.5B", "high.x"):
        try:
            high, normal = S.model_topics(name)
        except ConfigError:
            assert name == "high"  # would be the shared high topic
            continue
        assert (S.tier_of(high), S.tier_of(normal)) == ("high", "normal"), name
        assert S.is_request_topic(high) and S.is_request_topic(normal)
    assert S.tier_of("r.high") == "high" and S.tier_of("r") == "normal"  # the shared layout's
    assert not S.is_request_topic("r.x.y") and not S.is_request_topic("results")


def test_the_shared_layout_is_the_old_pair_and_group():
    shared = S.with_overrides(topic_layout="shared", model_name="chat")
    assert shared.model_topics("anything") == ("r.high", "r") and shared.worker_group == "g"


def test_served_names_come_from_the_files_as_vllm_names_them(tmp_path):
    assert served_name_of(default_model_path()) == DEFAULT_NAME
    assert served_name_of("org/model") == "org/model"  # a hub id as it is
    snap = tmp_path / "models--org--model" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert served_name_of(str(snap)) == "org/model"
    (tmp_path / "my-gpt").mkdir()
    assert served_name_of(str(tmp_path / "my-gpt")) == "my-gpt"
    assert Settings(model=str(tmp_path / "my-gpt"), model_name="chat").served_name == "chat"
    with pytest.raises(ConfigError):
        topic_segment("")

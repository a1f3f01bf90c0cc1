"""Several models behind one gateway (issue 26): the default embedder and a tiny GPT-2 with a chat
template, each with its own workers, request topics and consumer group, called with the
official `openai` client and `inferlog produce`, checked by reading the real topics."""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from click.testing import CliRunner
from confluent_kafka import Producer as KafkaProducer
from confluent_kafka.admin import AdminClient
from transformers import AutoTokenizer

from inferlog.clients import confluent_config
from inferlog.codec import REQUEST, RESULT, Codec
from inferlog.consumer.runners import load_runner
from inferlog.producer.cli import produce
from inferlog.producer.gateway import serve_in_thread
from inferlog.producer.sync import Producer as SdkProducer
from inferlog.replay.audit import load_window
from inferlog.settings import DEFAULT_NAME, default_model_path
from inferlog.topics import partition_counts, request_topics
from conftest import unique
from support import account, read_all, running_worker, wait_until
from test_gateway import KEYS, fresh_settings
from test_openai import chat_model, client  # noqa: F401  (fixture)
from tinymodels import tiny_gpt2_dir  # noqa: F401  (fixture)

CHAT = "tiny-chat"


@pytest.fixture(scope="module")
def two_models(kafka, chat_model):
    """One gateway (its own model: the default embedder), a worker of each model."""
    s = fresh_settings(kafka.bootstrap, api_keys=KEYS, gateway_max_wait_s=30, max_wait_ms=5, announce_interval_s=1)
    chat = s.with_overrides(model=str(chat_model), model_name=CHAT, worker_id=f"{s.worker_id}-chat")
    with running_worker(s, load_runner(default_model_path(), device="cpu")) as embedder, \
            running_worker(chat, load_runner(str(chat_model), device="cpu", name=CHAT)) as chatter, \
            serve_in_thread(s) as url:
        wait_until(lambda: {m.id for m in client(url).models.list()} == {DEFAULT_NAME, CHAT}, timeout=30,
                   what="both models listed")
        yield s, chat, url, embedder, chatter


def group_members(s, group: str) -> dict[str, list[tuple[str, int]]]:
    """{member id: its assigned (topic, partition)s}, from the broker."""
    admin = AdminClient(confluent_config(s))
    d = admin.describe_consumer_groups([group])[group].result(timeout=30)
    return {m.member_id: sorted((tp.topic, tp.partition) for tp in m.assignment.topic_partitions)
            for m in d.members}


def test_each_model_has_its_own_topics_and_group(two_models):
    s, chat, _, embedder, chatter = two_models
    assert chat.request_topics == (f"{s.high_priority_topic}.{CHAT}", f"{s.requests_topic}.{CHAT}")
    assert s.request_topics == (f"{s.high_priority_topic}.{DEFAULT_NAME}", f"{s.requests_topic}.{DEFAULT_NAME}")
    assert (s.worker_group, chat.worker_group) == (f"{s.group_id}.{DEFAULT_NAME}", f"{s.group_id}.{CHAT}")
    assert {t for t, _ in embedder.engine.partitions} == set(s.request_topics)
    assert {t for t, _ in chatter.engine.partitions} == set(chat.request_topics)
    # and its own outputs: a reader of one model's results never waits on the other's transactions
    assert chat.model_outputs() == (f"{s.results_topic}.{CHAT}", f"{s.deadletter_topic}.{CHAT}")
    assert s.model_outputs() == (f"{s.results_topic}.{DEFAULT_NAME}", f"{s.deadletter_topic}.{DEFAULT_NAME}")
    assert set(partition_counts(s, [*s.model_outputs(), *chat.model_outputs()])) == {*s.model_outputs(),
                                                                                      *chat.model_outputs()}
    # what audit and replay read: every model's topics, high tiers first
    assert request_topics(s) == [*sorted((s.request_topics[0], chat.request_topics[0])),
                                 *sorted((s.request_topics[1], chat.request_topics[1]))]


def test_one_gateway_answers_each_model_with_its_own_tokenizer(two_models, chat_model):
    s, chat, url, *_ = two_models
    c = client(url)
    vectors = c.embeddings.create(model=DEFAULT_NAME, input=["a parcel", "a refund"], encoding_format="float")
    assert [len(d.embedding) for d in vectors.data] == [384, 384] and vectors.model == DEFAULT_NAME
    messages = [{"role": "user", "content": "where is my parcel"}]
    answer = c.chat.completions.create(model=CHAT, messages=messages, max_tokens=4, temperature=0)
    assert answer.model == CHAT and isinstance(answer.choices[0].message.content, str)
    # the chat model's template and token count, though the gateway's own model is the embedder
    tok = AutoTokenizer.from_pretrained(chat_model)
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert answer.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    done = c.completions.create(model=CHAT, prompt="hello", max_tokens=3, temperature=0)
    assert done.model == CHAT and done.usage.completion_tokens >= 1
    # each request went to its model's topic, nowhere else
    codec = Codec.from_settings(s)
    on = {t: [codec.decode(r.value, expect=REQUEST)["model"] for r in read_all(s, t)]
          for t in (*s.request_topics, *chat.request_topics)}
    assert set(on[s.tier_topic("normal")]) == {DEFAULT_NAME}
    assert set(on[chat.tier_topic("normal")]) == {CHAT}


def test_a_model_nobody_serves_is_refused_and_nothing_is_published(two_models):
    s, chat, url, *_ = two_models
    before = {t: len(read_all(s, t)) for t in request_topics(s)}
    with pytest.raises(openai.NotFoundError) as e:
        client(url).embeddings.create(model="no-such-model", input="x")
    assert e.value.code == "model_not_found" and "served: " in e.value.message
    assert CHAT in e.value.message and DEFAULT_NAME in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # a task the model does not do
        client(url).embeddings.create(model=CHAT, input="x")
    assert e.value.code == "unsupported_task"
    assert {t: len(read_all(s, t)) for t in request_topics(s)} == before
    assert not [t for t in partition_counts(s) if "no-such-model" in t]  # no topic made for it either


def test_inferlog_produce_routes_each_line_by_its_model(two_models, tmp_path):
    s, chat, *_ = two_models
    lines = [{"task": "embed", "inputs": "to the embedder", "model": DEFAULT_NAME},
             {"task": "generate", "inputs": "to the chat model", "model": CHAT, "parameters": {"max_new_tokens": 2}},
             {"task": "embed", "inputs": "no model: the default's"},
             {"task": "generate", "inputs": "urgent", "model": CHAT, "priority": 5,
              "parameters": {"max_new_tokens": 2}}]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = {t: len(read_all(s, t)) for t in (*s.request_topics, *chat.request_topics)}
    flags = ["--bootstrap-servers", s.bootstrap_servers, "--topic", s.requests_topic,
             "--high-priority-topic", s.high_priority_topic, "--models-topic", s.models_topic]
    res = CliRunner().invoke(produce, [str(src), *flags])
    assert res.exit_code == 0, res.output
    after = {t: len(read_all(s, t)) - n for t, n in before.items()}
    assert after == {s.tier_topic("high"): 0, s.tier_topic("normal"): 2, chat.tier_topic("high"): 1,
                     chat.tier_topic("normal"): 1}, res.output


def test_audit_reads_every_models_topics_or_one_models(two_models):
    s, chat, *_ = two_models
    wait_until(lambda: not account(s, models=[DEFAULT_NAME, CHAT]).missing, timeout=90, what="every request answered")
    every = load_window(s, None, None)
    one = load_window(s, None, None, models=(CHAT,))
    assert set(every["results"]["model_name"].to_pylist()) == {DEFAULT_NAME, CHAT}
    # each model's results are read from its own results topic (audit reads every model's)
    assert s.model_results_topic != chat.model_results_topic
    assert set(zip(every["results"]["model_name"].to_pylist(), every["results"]["topic"].to_pylist())) == \
        {(DEFAULT_NAME, s.model_results_topic), (CHAT, chat.model_results_topic)}
    assert set(one["results"]["topic"].to_pylist()) == {chat.model_results_topic}
    assert set(one["results"]["model_name"].to_pylist()) == {CHAT}
    assert set(one["results"]["source_topic"].to_pylist()) <= set(chat.request_topics)
    on_chat = sum(len(read_all(s, t)) for t in chat.request_topics)
    assert one["requests"].num_rows == on_chat < every["requests"].num_rows
    assert one["results"].num_rows + one["dead_letters"].num_rows == on_chat


def test_a_worker_joining_one_model_leaves_the_other_models_group_alone(two_models):
    s, chat, url, embedder, chatter = two_models
    chat_group = group_members(s, chat.worker_group)
    held = sorted(chatter.engine.partitions)
    assert len(chat_group) == 1 and len(held) == 2 * s.partitions
    stop, answered, failed = threading.Event(), [], []

    def chat_traffic():  # the chat model keeps serving while the embedder's group rebalances
        c = client(url)
        while not stop.is_set():
            try:
                r = c.completions.create(model=CHAT, prompt="steady", max_tokens=2, temperature=0)
                answered.append(r.id)
            except Exception as e:  # noqa: BLE001 - counted; the test asserts there are none
                failed.append(repr(e))

    t = threading.Thread(target=chat_traffic, daemon=True)
    t.start()
    try:
        second = s.with_overrides(worker_id=f"{s.worker_id}-b")
        with running_worker(second, load_runner(default_model_path(), device="cpu")) as joined:
            wait_until(lambda: len(group_members(s, s.worker_group)) == 2 and joined.engine.partitions
                       and len(embedder.engine.partitions) < 2 * s.partitions, timeout=60,
                       what="the embedder's group shared over two members")
            assert group_members(s, chat.worker_group) == chat_group
            assert sorted(chatter.engine.partitions) == held
            n = len(answered)
            wait_until(lambda: len(answered) > n, timeout=30, what="a chat answer after the join")
    finally:
        stop.set()
        t.join(60)
    assert not failed and answered
    assert group_members(s, chat.worker_group) == chat_group and sorted(chatter.engine.partitions) == held


def test_every_offset_of_every_models_topics_ends_exactly_once(two_models):
    s, chat, *_ = two_models
    models = [DEFAULT_NAME, CHAT]
    wanted = len(account(s, models=models).requests)

    def outputs() -> int:
        a = account(s, models=models)
        return len(a.results) + len(a.dead_letters)

    wait_until(lambda: outputs() >= wanted, timeout=90, what="every request answered")
    acc = account(s, models=models)
    acc.assert_exactly_once()
    assert {r["model"]["name"] for r in acc.results} == {DEFAULT_NAME, CHAT}
    codec = Codec.from_settings(s)
    for m in models:  # each model's results topic holds its own model's results only
        assert {codec.decode(r.value, expect=RESULT)["model"]["name"] for r in read_all(s, s.model_outputs(m)[0])} == {m}


def test_an_open_transaction_of_one_model_never_holds_back_anothers_answers(two_models):
    """A read_committed reader sees nothing on a partition past a transaction still open there.
    Each model has its own results topics, so a transaction of one model's that stays open (a
    worker stalled mid-commit, up to transaction.timeout.ms) holds back that model's answers
    only: the other's still come, through the gateway and through the SDK."""
    s, chat, url, *_ = two_models
    stalled = KafkaProducer(confluent_config(chat, **{"transactional.id": unique("stalled"),
                                                      "transaction.timeout.ms": 300_000}))
    stalled.init_transactions(30)
    stalled.begin_transaction()
    for p in range(s.partitions):  # open on every partition of the chat model's results
        stalled.produce(chat.model_results_topic, b"never committed", partition=p)
    assert stalled.flush(30) == 0
    try:
        res = client(url).with_options(timeout=30, max_retries=0).embeddings.create(model=DEFAULT_NAME, input=["answered"])
        assert len(res.data[0].embedding) == 384
        with SdkProducer(s) as p:
            assert p.infer("embed", "answered too", timeout=30)["status"] == "OK"
    finally:
        stalled.abort_transaction(30)


# the worst a client can put in `model`: paths, control characters, near-misses of a served
# name, a tier's name, dots (a topic separator), other scripts, a name of 5,000 characters
HOSTILE_MODELS = ["../../etc/passwd", "tiny-chat\n", "tiny-chat ", "TINY-CHAT", "tiny-chat\x00", "high",
                  "a.b.c", "модель", "%2e%2e", "x" * 5000]


def test_a_hostile_model_name_is_refused_everywhere_and_publishes_nothing(two_models):
    s, chat, url, *_ = two_models
    before = {t: len(read_all(s, t)) for t in request_topics(s)}
    topics = set(partition_counts(s))
    headers = {"Authorization": "Bearer key-a"}
    with httpx.Client(base_url=url, timeout=30) as http:
        for name in HOSTILE_MODELS:
            r = http.post("/v1/requests", json={"task": "embed", "inputs": "x", "model": name}, headers=headers)
            assert r.status_code == 404 and r.json()["detail"]["reason"] == "UNKNOWN_MODEL", (name[:40], r.text[:300])
            r = http.post("/v1/embeddings", json={"model": name, "input": "x"}, headers=headers)
            # OpenAI's shape: 404 model_not_found, or 400 for a name longer than its 256 characters
            assert r.status_code in (400, 404) and r.json()["error"]["param"] == "model", (name[:40], r.text[:300])
        metrics = http.get("/metrics").text
    assert {t: len(read_all(s, t)) for t in request_topics(s)} == before
    assert set(partition_counts(s)) == topics  # no topic made for any of them
    # the metrics' model label holds served names only: a client cannot grow its series
    labels = {line.split('model="')[1].split('"')[0] for line in metrics.splitlines()
              if line.startswith("inferlog_gateway_requests_total{") and 'model="' in line}
    assert labels <= {DEFAULT_NAME, CHAT, "unknown"}, labels

"""The gateway's OpenAI-compatible endpoints, called with the official `openai` client, answered
by real workers through the real broker: embeddings from the embedded MiniLM, completions and
chat from a tiny GPT-2 given a chat template here."""
from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from inferlog.codec import REQUEST, Codec
from inferlog.consumer.runners import Row, load_runner
from inferlog.request import Parameters
from inferlog.settings import default_model_path
from inferlog.producer.gateway import serve_in_thread
from support import read_all, running_worker, wait_until
from test_gateway import KEYS, fresh_settings
from tinymodels import tiny_gpt2_dir  # noqa: F401  (fixture)

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def client(url: str, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def embed_stack(kafka):
    runner = load_runner(default_model_path(), device="cpu")
    s = fresh_settings(kafka.bootstrap, api_keys=KEYS, gateway_max_wait_s=30, max_wait_ms=5)
    with running_worker(s, runner), serve_in_thread(s) as url:
        yield s, url, runner


@pytest.fixture(scope="module")
def chat_model(tiny_gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 with a chat template in its tokenizer (tiny_gpt2_dir itself has none)."""
    d = tmp_path_factory.mktemp("tiny-chat") / "tiny-chat"
    shutil.copytree(tiny_gpt2_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gen_stack(kafka, chat_model, tiny_gpt2_dir):
    """A generation worker on the chat model, a second on the template-less tiny GPT-2 (a model
    of its own name), and a gateway, which loads each one's tokenizer from the registry."""
    runner = load_runner(str(chat_model), device="cpu")
    s = fresh_settings(kafka.bootstrap, api_keys=KEYS, gateway_max_wait_s=30, max_wait_ms=5, model=str(chat_model))
    bare = s.with_overrides(model=str(tiny_gpt2_dir), worker_id=f"{s.worker_id}-bare")
    bare_runner = load_runner(str(tiny_gpt2_dir), device="cpu")
    with running_worker(s, runner), running_worker(bare, bare_runner), serve_in_thread(s) as url:
        yield s, url, bare_runner.info.name, runner


def direct_text(runner, prompt: str, max_new_tokens: int) -> tuple[str, int, str]:
    """What the model answers alone, greedy: (text, tokens, finish_reason)."""
    rows = [Row(ids, Parameters(max_new_tokens=max_new_tokens)) for ids in runner.tokenize([prompt])]
    prepared = runner.prepare(rows)
    out = runner.finish(runner.run(prepared), prepared)[0]
    return out["text"], out["tokens"], out["finish_reason"]


# -- embeddings ----------------------------------------------------------------------------------
def test_embeddings_match_the_model_in_both_encodings(embed_stack):
    s, url, runner = embed_stack
    texts = ["the parcel arrived damaged", "refund issued within a week"]
    rows = [Row(ids, Parameters()) for ids in runner.tokenize(texts)]
    prepared = runner.prepare(rows)
    want = np.stack([o["vector"] for o in runner.finish(runner.run(prepared), prepared)])
    c = client(url)
    got_b64 = c.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    got_float = c.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    for got in (got_b64, got_float):
        assert got.model == "all-MiniLM-L6-v2" and [d.index for d in got.data] == [0, 1]
        np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
        assert got.usage.prompt_tokens == sum(len(r.ids) for r in rows) == got.usage.total_tokens
    cut = c.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], dimensions=64, encoding_format="float")
    v = np.array(cut.data[0].embedding)
    assert v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-5
    np.testing.assert_allclose(v, want[0][:64] / np.linalg.norm(want[0][:64]), atol=1e-5)


def test_the_request_on_the_log_is_the_tenants_with_the_calls_shape(embed_stack):
    s, url, _ = embed_stack
    client(url, "key-b").embeddings.create(model="all-MiniLM-L6-v2", input="which tenant asked", user="u1")
    codec = Codec.from_settings(s)
    reqs = [codec.decode(r.value, expect=REQUEST) for r in read_all(s, s.tier_topic("normal"))]
    (req,) = [r for r in reqs if r["inputs"] == ["which tenant asked"]]
    assert req["tenant"] == "tenant-b" and req["task"] == "EMBED" and req["model"] == "all-MiniLM-L6-v2"
    assert req["metadata"]["openai.url"] == "/v1/embeddings"


def test_errors_come_in_openais_shape(embed_stack):
    _, url, _ = embed_stack
    c = client(url)
    with pytest.raises(openai.NotFoundError) as e:  # no worker announces it (inferlog/registry.py)
        c.embeddings.create(model="no-such-model", input="x")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:  # the worker announces embeddings only
        c.completions.create(model="all-MiniLM-L6-v2", prompt="x")
    assert "UNSUPPORTED_TASK" in e.value.message and e.value.code == "unsupported_task"
    with pytest.raises(openai.BadRequestError) as e:  # nor chat: refused for its task before any template
        c.chat.completions.create(model="all-MiniLM-L6-v2", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "unsupported_task" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="all-MiniLM-L6-v2", input=[])
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="all-MiniLM-L6-v2", input="x", extra_body={"bogus": 1})
    assert "bogus" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong-key").embeddings.create(model="all-MiniLM-L6-v2", input="x")


def test_ready_means_the_tokenizer_is_loaded_and_the_first_call_does_not_load_it(embed_stack, tokenizer_loads):
    """The tokenizer loads at start-up, off the loop (/readyz answers 503 meanwhile); once ready,
    the first OpenAI call is answered with no load on its way (it took 3-9 s on that call)."""
    s, _, _ = embed_stack
    loads, release = tokenizer_loads
    with serve_in_thread(s) as url, httpx.Client(base_url=url, timeout=30) as c:
        try:
            wait_until(lambda: loads, timeout=30, what="the tokenizer's load to begin at start-up")
            r = c.get("/readyz")
            assert r.status_code == 503 and "tokenizer" in r.json()["detail"], r.text
        finally:
            release.set()
        wait_until(lambda: c.get("/readyz").status_code == 200, timeout=30, what="/readyz to say ready")
        assert c.get("/readyz").json()["tokenizer"] == "loaded" and loads == [s.model]
        got = client(url).embeddings.create(model="all-MiniLM-L6-v2", input="the first call", encoding_format="float")
        assert len(got.data[0].embedding) == 384 and got.usage.prompt_tokens > 0
        assert loads == [s.model]


def test_a_bad_body_names_the_fields_path_or_null(embed_stack):
    _, url, _ = embed_stack
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="all-MiniLM-L6-v2", messages=[{"role": "user", "content": 5}])
    assert e.value.param == "messages[0].content"
    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "m", "messages": [',
                   headers={"X-API-Key": "key-a", "content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] is None and "not valid JSON" in r.text, r.text


# -- completions and chat ------------------------------------------------------------------------
def test_completions_are_the_models_greedy_text_one_choice_per_prompt(gen_stack):
    s, url, _, runner = gen_stack
    prompts = ["the quick red fox", "kafka topics carry"]
    got = client(url).completions.create(model=runner.info.name, prompt=prompts, max_tokens=6, temperature=0)
    assert got.object == "text_completion" and got.id.startswith("cmpl-")
    assert [c.index for c in got.choices] == [0, 1]
    for choice, prompt in zip(got.choices, prompts):
        text, tokens, reason = direct_text(runner, prompt, 6)
        assert (choice.text, choice.finish_reason) == (text, reason)
    assert got.usage.completion_tokens == sum(direct_text(runner, p, 6)[1] for p in prompts)
    assert got.usage.prompt_tokens == sum(len(ids) for ids in runner.tokenize(prompts))


def test_a_stop_sequence_cuts_the_text(gen_stack):
    _, url, _, runner = gen_stack
    text, _, _ = direct_text(runner, "the slow cat", 12)
    stop = next(ch for ch in text[len(text) // 2:] if ch.strip())  # a visible character of its second half
    got = client(url).completions.create(model=runner.info.name, prompt="the slow cat", max_tokens=12, stop=[stop])
    assert got.choices[0].text == text[: text.index(stop)] and got.choices[0].finish_reason == "stop"


def test_chat_goes_through_the_template_and_streams_the_same_answer(gen_stack, chat_model):
    s, url, _, runner = gen_stack
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the tiny bird"}]
    c = client(url)
    got = c.chat.completions.create(model=runner.info.name, messages=messages, max_completion_tokens=5)
    prompt = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
    assert prompt == "<system>be brief\n<user>the tiny bird\n<assistant>"
    text, tokens, reason = direct_text(runner, prompt, 5)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (text, reason)
    assert got.usage.completion_tokens == tokens
    codec = Codec.from_settings(s)
    assert prompt in [codec.decode(r.value, expect=REQUEST)["inputs"][0] for r in read_all(s, s.tier_topic("normal"))]
    chunks = list(c.chat.completions.create(model=runner.info.name, messages=messages, max_completion_tokens=5,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [reason]
    assert chunks[-1].usage.completion_tokens == tokens
    streamed = list(c.completions.create(model=runner.info.name, prompt="the quick red fox", max_tokens=6, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == direct_text(runner, "the quick red fox", 6)[0]


def test_service_tier_priority_goes_to_the_high_tier_and_is_echoed(gen_stack):
    """OpenAI's service_tier picks the tier: "priority" publishes on the high tier's topic, every
    other value (or none) on the normal one; the answer says which served it, as OpenAI's do."""
    s, url, _, runner = gen_stack
    c, codec = client(url), Codec.from_settings(s)
    messages = [{"role": "user", "content": "the urgent owl"}]
    fast = c.chat.completions.create(model=runner.info.name, messages=messages, max_completion_tokens=4,
                                     service_tier="priority")
    plain = c.chat.completions.create(model=runner.info.name, messages=messages, max_completion_tokens=4,
                                      service_tier="flex")
    assert (fast.service_tier, plain.service_tier) == ("priority", "default")
    assert fast.choices[0].message.content == plain.choices[0].message.content  # the same model, greedy
    streamed = list(c.completions.create(model=runner.info.name, prompt="the urgent owl", max_tokens=4, stream=True,
                                         extra_body={"service_tier": "priority"}))
    assert {ch.service_tier for ch in streamed} == {"priority"}
    high = {codec.decode(r.value, expect=REQUEST)["request_id"] for r in read_all(s, s.tier_topic("high"))}
    normal = {codec.decode(r.value, expect=REQUEST)["request_id"] for r in read_all(s, s.tier_topic("normal"))}
    assert fast.id.removeprefix("chatcmpl-") in high and plain.id.removeprefix("chatcmpl-") in normal
    assert streamed[0].id.removeprefix("cmpl-") in high
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model=runner.info.name, input="x", extra_body={"service_tier": "gold"})
    assert "service_tier" in e.value.message


def test_chat_without_a_template_and_unsupported_options_are_400(gen_stack):
    _, url, bare, runner = gen_stack
    with pytest.raises(openai.BadRequestError) as e:  # that model's tokenizer has none, whatever the gateway's has
        wait_until(lambda: bare in {m.id for m in client(url).models.list()}, what="the template-less model listed")
        client(url).chat.completions.create(model=bare, messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "no_chat_template" and "/v1/completions" in e.value.message
    c = client(url)
    for extra in ({"n": 2}, {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"logprobs": True},
                  {"presence_penalty": 0.5}):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=runner.info.name, messages=[{"role": "user", "content": "hi"}], **extra)
        assert next(iter(extra)) in e.value.message
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=runner.info.name, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])
    with pytest.raises(openai.BadRequestError) as e:  # a bad sampling value the worker would refuse
        c.completions.create(model=runner.info.name, prompt="x", temperature=5)
    assert json.dumps(e.value.body)  # an OpenAI error body


# -- Batch API files -------------------------------------------------------------------------------
def test_a_batch_file_goes_in_and_its_output_comes_out_by_custom_id(gen_stack, chat_model, tmp_path):
    """produce --format openai-batch publishes each line keyed by its custom_id; once the worker
    answered, audit export --format openai-batch writes one output line per custom_id: the
    endpoint's response body, or the error its dead letter maps to."""
    from click.testing import CliRunner

    from inferlog.producer.cli import produce
    from inferlog.replay.audit import audit_export
    from support import wait_until, output_count

    s, _, _, runner = gen_stack
    name = runner.info.name
    lines = [
        {"custom_id": "c-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": name, "prompt": "the quick red fox", "max_tokens": 6}},
        {"custom_id": "c-2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": name, "messages": [{"role": "user", "content": "the tiny bird"}], "max_tokens": 5,
                  "service_tier": "priority"}},
        {"custom_id": "c-3", "method": "POST", "url": "/v1/embeddings",  # this worker generates: an error line
         "body": {"model": name, "input": "not served here"}},
        {"custom_id": "c-4", "method": "POST", "url": "/v1/images", "body": {}},  # refused at produce
        {"custom_id": "c-1", "method": "POST", "url": "/v1/completions", "body": {"model": name, "prompt": "y"}},
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = output_count(s)
    # --no-check-models: c-3 is published as written, so that the export's error line for its dead
    # letter is tested (with the check, produce refuses it: test_sdk_models.py)
    res = CliRunner().invoke(produce, [str(batch), "--format", "openai-batch", "--bootstrap-servers",
                                       s.bootstrap_servers, "--topic", s.requests_topic,
                                       "--high-priority-topic", s.high_priority_topic,
                                       "--models-topic", s.models_topic, "--no-check-models",
                                       "--tokenizer", str(chat_model), "--tenant", "batch-tenant"])
    assert res.exit_code == 1, res.output  # two lines were invalid; the others went out
    assert f"sent 3 requests (1 to {s.tier_topic('high')}, 2 to {s.tier_topic('normal')})" in res.output
    assert "line 4: INVALID_REQUEST: url:" in res.output and "line 5: INVALID_REQUEST: custom_id 'c-1' repeats" in res.output
    wait_until(lambda: output_count(s) >= before + 3, timeout=120, what="the batch's outcomes")
    codec = Codec.from_settings(s)
    keyed = {r.key.decode(): codec.decode(r.value, expect=REQUEST)
             for r in read_all(s, s.tier_topic("normal")) + read_all(s, s.tier_topic("high"))
             if r.key and r.key.decode().startswith("c-")}
    assert set(keyed) == {"c-1", "c-2", "c-3"} and {r["tenant"] for r in keyed.values()} == {"batch-tenant"}
    assert [r.key for r in read_all(s, s.tier_topic("high")) if r.key and r.key.startswith(b"c-")] == [b"c-2"]

    out = tmp_path / "batch_output.jsonl"
    res = CliRunner().invoke(audit_export, ["--format", "openai-batch", "--out", str(out), "--tokenizer",
                                            str(chat_model), "--bootstrap-servers", s.bootstrap_servers,
                                            "--requests-topic", s.requests_topic, "--high-priority-topic",
                                            s.high_priority_topic, "--results-topic", s.results_topic,
                                            "--deadletter-topic", s.deadletter_topic])
    assert res.exit_code == 0, res.output
    got = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert set(got) == {"c-1", "c-2", "c-3"}
    for cid, x in got.items():
        assert x["id"] == f"batch_req_{keyed[cid]['request_id']}" and x["error"] is None
        assert x["response"]["request_id"] == keyed[cid]["request_id"]
    c1, c2 = got["c-1"]["response"], got["c-2"]["response"]
    assert c1["status_code"] == 200 and c1["body"]["object"] == "text_completion"
    assert c1["body"]["choices"][0]["text"] == direct_text(runner, "the quick red fox", 6)[0]
    prompt = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(
        [{"role": "user", "content": "the tiny bird"}], tokenize=False, add_generation_prompt=True)
    assert c2["status_code"] == 200 and c2["body"]["object"] == "chat.completion"
    assert (c1["body"]["service_tier"], c2["body"]["service_tier"]) == ("default", "priority")
    assert c2["body"]["choices"][0]["message"]["content"] == direct_text(runner, prompt, 5)[0]
    assert c2["body"]["usage"]["prompt_tokens"] == len(runner.tokenize([prompt])[0])
    assert got["c-3"]["response"]["status_code"] == 400
    assert "UNSUPPORTED_TASK" in got["c-3"]["response"]["body"]["error"]["message"]


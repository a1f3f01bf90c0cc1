"""Security against a dedicated SASL/SCRAM + ACL broker (and a SASL_SSL one): who can connect,
what each role may do, and that passwords stay out of every log.

The module's broker is started by the CLI (`inferlog --log-level DEBUG kafka start --sasl`)
in a subprocess, so the CLI's own output is one of the logs checked for secrets.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer as KafkaProducer, TopicPartition

from conftest import REPO, free_port, unique
from inferlog.clients import aiokafka_kwargs, confluent_config, redacted
from inferlog.localkafka import LocalKafka
from inferlog.producer.sync import ProduceError, Producer
from inferlog.registry import ModelDirectory
from inferlog.security import ROLES, generate_certs, role_acls
from inferlog.settings import Settings, load_settings
from inferlog.topics import ensure_topics
from support import account, cli_env, output_count, read_all, running_worker, wait_until

pytestmark = pytest.mark.kafka
VERSION = load_settings().kafka_version
LIBS = REPO / ".kafka" / "libs" / VERSION


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`inferlog --log-level DEBUG ...` in a subprocess, stdout and stderr together."""
    res = subprocess.run([sys.executable, "-m", "inferlog.cli", "--log-level", "DEBUG", *args],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=180)
    res.output = res.stdout + res.stderr
    return res


@dataclass
class Secure:
    lk: LocalKafka
    passwords: dict[str, str]
    names: dict[str, object]  # topic and group names (and partitions), as Settings fields
    logs: list[str]  # CLI output, checked for secrets

    def as_user(self, user: str | None, **fields) -> Settings:
        return self.lk.client_settings(user, **self.names, **fields)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    data = tmp_path_factory.mktemp("secure-kafka") / "data"
    port, cport = free_port(), free_port()
    broker = ["--version", VERSION, "--libs-dir", str(LIBS), "--data-dir", str(data),
              "--port", str(port), "--controller-port", str(cport)]
    started = cli("kafka", "start", "--no-fetch", "--sasl", *broker)
    users_file = data / "sasl" / "users.json"
    try:
        assert started.returncode == 0, started.output
        passwords = json.loads(users_file.read_text())
        lk = LocalKafka(LIBS, data, port, cport, VERSION, sasl_users=passwords)
        tag = unique("sec")
        names = dict(requests_topic=f"{tag}.requests", high_priority_topic=f"{tag}.requests.high",
                     results_topic=f"{tag}.results", deadletter_topic=f"{tag}.deadletter",
                     group_id=f"{tag}.workers", partitions=3)
        ensure_topics(lk.client_settings("admin", **names))
        topic_env = {f"INFERLOG_{k.upper()}": str(v) for k, v in names.items()}
        granted = cli("kafka", "acls", "--standard", env={**_env_file(data / "sasl" / "admin.env"), **topic_env})
        assert granted.returncode == 0, granted.output
        yield Secure(lk, passwords, names, [started.output, granted.output])
    finally:
        LocalKafka(LIBS, data, port, cport, VERSION).stop()


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def connect_error(settings: Settings, timeout: float = 8, **extra) -> KafkaError | None:
    """The error a client gets when it asks for metadata; None if it got in."""
    seen: list[KafkaError] = []
    p = KafkaProducer(confluent_config(settings, error_cb=seen.append, **extra))
    deadline = time.monotonic() + timeout
    while True:
        try:
            p.list_topics(timeout=1)
            return None
        except KafkaException as e:
            p.poll(0.2)  # serves error_cb: the reason (authentication, TLS) is there
            reasons = [err for err in seen if err.code() != KafkaError._ALL_BROKERS_DOWN]
            if reasons or time.monotonic() > deadline:
                return (reasons or seen or [e.args[0]])[0]


def produce_error(settings: Settings, topic: str) -> KafkaError | None:
    p = KafkaProducer(confluent_config(settings, **{"message.timeout.ms": 10000}))
    got: list = []
    p.produce(topic, b"x", b"k", on_delivery=lambda err, msg: got.append(err))
    p.flush(15)
    return got[0] if got else "no delivery report"


AUTHZ = {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED}


def read_errors(settings: Settings, topic: str, group: str | None = None) -> set[int]:
    """Error codes a consumer in `group` gets reading `topic` from the start by assignment,
    until it is refused or 10 s pass. A group it may not use is refused before the topic."""
    c = Consumer(confluent_config(settings, **{"group.id": group or unique("probe"), "enable.auto.commit": False}))
    codes: set[int] = set()
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 10
        while not codes & AUTHZ and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None:
                assert m.error() is not None, f"read a record of {topic}"
                codes.add(m.error().code())
        return codes
    finally:
        c.close()


def first_record(settings: Settings, topic: str, group: str):
    """The first record of `topic`'s partition 0 a consumer in `group` reads by assignment
    (None if it reads none in 10 s); an error other than the partition's end fails."""
    c = Consumer(confluent_config(settings, **{"group.id": group, "enable.auto.commit": False}))
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None:
                assert m.error() is None or m.error().code() == KafkaError._PARTITION_EOF, m.error()
                if m.error() is None:
                    return m
        return None
    finally:
        c.close()


def describe_error(settings: Settings, topic: str) -> KafkaError | None:
    """Whether the principal may even see `topic` (DESCRIBE, implied by READ and WRITE)."""
    c = Consumer(confluent_config(settings, **{"group.id": unique("probe")}))
    try:
        return c.list_topics(topic, timeout=10).topics[topic].error
    finally:
        c.close()


# -- who can connect ---------------------------------------------------------------------------
def test_client_without_credentials_is_refused(secure, caplog):
    caplog.set_level(logging.DEBUG, logger="rdkafka")
    err = connect_error(secure.as_user(None), timeout=3, logger=logging.getLogger("rdkafka"))
    assert err is not None and err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN), err
    # the broker hangs up on a client that does not open with a SASL handshake
    assert "Disconnected: connection closed by peer" in caplog.text, caplog.text


def test_wrong_password_is_refused(secure):
    s = secure.as_user("producer").with_overrides(sasl_password="not-the-password")
    err = connect_error(s)
    assert err is not None and err.code() == KafkaError._AUTHENTICATION, err
    assert "invalid credentials" in err.str().lower()


@pytest.mark.timeout(90)  # it used to log the refusal and go on waiting: the test's own timeout bounds it
def test_produce_and_flush_with_a_wrong_password_end_at_once_with_one_line(secure, tmp_path):
    s = secure.as_user("producer").with_overrides(sasl_password="not-the-password")
    src = tmp_path / "in.jsonl"
    src.write_text('"one"\n"two"\n')
    # --timeout 600: only the refusal can end it within the subprocess timeout
    res = subprocess.run([sys.executable, "-m", "inferlog.cli", "produce", str(src), "--timeout", "600"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, **cli_env(s), "INFERLOG_REQUESTS_TOPIC": s.requests_topic})
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1 and lines[0].startswith(f"Error: Kafka at {s.bootstrap_servers} refused this client"), lines
    assert "authentication" in lines[0].lower() and "not-the-password" not in res.stderr
    p = Producer(s)  # the SDK's flush ends on the refusal too, long before its timeout
    p.submit("embed", "never delivered")
    with pytest.raises(ProduceError) as e:
        p.flush(600)
    assert e.value.reason == "_AUTHENTICATION", e.value
    p.abandon()


def test_unknown_user_is_refused(secure):
    s = secure.as_user("producer").with_overrides(sasl_username="mallory")
    assert connect_error(s).code() == KafkaError._AUTHENTICATION


# -- the producer role -------------------------------------------------------------------------
def test_producer_principal_submits_but_cannot_read_or_write_results(secure):
    prod = secure.as_user("producer")
    with Producer(prod) as p:
        ids = [p.submit("embed", f"hello {i}") for i in range(5)]
        ids.append(p.submit("embed", "urgent", priority=5))  # the high tier too
    assert len(set(ids)) == 6

    # it may not even see the results topic, nor read the requests it wrote
    assert describe_error(prod, prod.model_results_topic).code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert read_errors(prod, prod.model_results_topic) & AUTHZ
    assert read_errors(prod, prod.tier_topic("normal")) & AUTHZ
    assert produce_error(prod, prod.model_results_topic).code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert produce_error(prod, prod.model_deadletter_topic).code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


# -- the worker role ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embed_runner():
    from inferlog.consumer.runners import load_runner
    from inferlog.settings import default_model_path

    return load_runner(default_model_path(), device="cpu")


def test_worker_principal_answers_exactly_once_and_nothing_more(secure, embed_runner, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with Producer(secure.as_user("producer")) as p:
        for i in range(20):
            p.submit("embed", f"request {i}", priority=5 if i % 4 == 0 else 0)
    auditor = secure.as_user("auditor")
    worker = secure.as_user("worker", worker_id=unique("w"), max_wait_ms=5)
    with running_worker(worker, embed_runner):
        with Producer(secure.as_user("gateway")) as gw:  # request-reply: writes, then reads the result
            assert gw.infer("embed", "a question", timeout=60)["status"] == "OK"
        # the worker announced its model (its role writes the registry), the gateway's role reads it
        models = ModelDirectory(secure.as_user("gateway")).start()
        try:
            assert models.wait_ready(30), models.error
            assert [m.worker_id for m in models.live()["all-MiniLM-L6-v2"].members] == [worker.worker_id]
        finally:
            models.stop()
        requests = request_positions(auditor)  # with the earlier test's requests, if it ran
        assert len(requests) >= 21
        wait_until(lambda: output_count(auditor) >= len(requests), timeout=90, what="all results")
    # account() keys by (partition, offset) of one requests topic; both tiers are in play
    # here, so count by (topic, partition, offset), read as the auditor.
    acc = account(auditor)
    answered = Counter((o["source"]["topic"], o["source"]["partition"], o["source"]["offset"])
                       for o in acc.results + acc.dead_letters)
    assert answered == Counter(requests), "not every request answered exactly once"
    assert not acc.dead_letters and {r["status"] for r in acc.results} == {"OK"}

    assert produce_error(worker, worker.tier_topic("normal")).code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # it sees the results topic and reads it back by assignment (its sweep), in its own group
    assert describe_error(worker, worker.model_results_topic) is None
    assert first_record(worker, worker.model_results_topic, worker.worker_group) is not None
    # its own group only: another group id cannot join
    c = Consumer(confluent_config(worker, **{"group.id": unique("other"), "auto.offset.reset": "earliest"}))
    try:
        c.subscribe([worker.tier_topic("normal")])
        errs = [m.error() for m in c.consume(10, 8) if m.error() is not None]
        assert errs and errs[0].code() == KafkaError.GROUP_AUTHORIZATION_FAILED, errs
    finally:
        c.close()

    out, err = capfd.readouterr()
    logs = caplog.text + out + err
    assert "joined group" in logs  # the worker's DEBUG/INFO log was captured
    assert "sweep skipped" not in logs  # its sweep may read what it wrote
    assert_no_secrets(secure, logs)


def request_positions(settings: Settings) -> list[tuple[str, int, int]]:
    return [(t, r.partition, r.offset) for t in (settings.tier_topic("normal"), settings.tier_topic("high"))
            for r in read_all(settings, t)]


# -- secrets -----------------------------------------------------------------------------------
def assert_no_secrets(secure: Secure, text: str) -> None:
    for user, pw in secure.passwords.items():
        assert pw not in text, f"the password of {user} leaked"


def test_cli_output_and_broker_log_hold_no_secrets(secure):
    started, granted = secure.logs
    assert "users.json" in started and "mode 0600" in started
    assert "allow User:worker WRITE on transactional_id" in granted
    for text in (*secure.logs, secure.lk.log_file.read_text(errors="replace")):
        assert_no_secrets(secure, text)
    sasl_dir = secure.lk.data_dir / "sasl"
    for f in [*sasl_dir.iterdir(), secure.lk.properties_file]:
        assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"


def test_settings_and_redacted_configs_hide_the_password(secure):
    s = secure.as_user("worker")
    pw = secure.passwords["worker"]
    assert confluent_config(s)["sasl.password"] == pw  # the client does get it
    for text in (repr(s), str(s), repr(s.model_dump()), str(redacted(confluent_config(s))),
                 str(redacted(aiokafka_kwargs(s)))):
        assert pw not in text


def test_cli_acls_dry_run_lists_role_acls():
    res = cli("kafka", "acls", "--principal", "User:p", "--role", "producer", "--dry-run")
    assert res.returncode == 0, res.output
    assert "would allow User:p WRITE on topic 'inferlog.requests'" in res.output
    assert "IDEMPOTENT_WRITE on cluster 'kafka-cluster'" in res.output
    assert cli("kafka", "acls", "--standard", "--role", "worker").returncode != 0


def test_roles_follow_settings_and_never_grant_cross_writes():
    s = load_settings(group_id="g1", results_topic="r", requests_topic="q", high_priority_topic="qh")
    acls = {role: role_acls(role, f"User:{role}", s) for role in ROLES}
    writes = {role: {a.name for a in acl if a.operation == "WRITE" and a.resource == "topic"} for role, acl in acls.items()}
    reads = {role: {a.name for a in acl if a.operation == "READ" and a.resource == "topic"} for role, acl in acls.items()}
    # request topics: every model's (q.<model>, qh.<model>: prefixed) and the shared layout's (literal)
    requests = {"q", "qh", "q.", "qh."}
    # outputs likewise: every model's (r.<model>, its dead letters': prefixed) and the shared ones
    outputs = {"r", "r.", s.deadletter_topic, s.deadletter_topic + "."}
    assert writes == {"producer": requests, "gateway": requests, "worker": outputs | {s.models_topic}, "auditor": set()}
    assert {(a.name, a.pattern) for a in acls["producer"] if a.operation == "WRITE"} == {
        ("q", "literal"), ("qh", "literal"), ("q.", "prefixed"), ("qh.", "prefixed")}
    assert reads["producer"] == {s.models_topic}  # the registry: the model check
    assert reads["worker"] == requests | outputs  # its outputs: the sweep reads them back
    assert reads["gateway"] == outputs | {s.models_topic}  # the model registry, by assignment
    assert reads["auditor"] == requests | outputs
    granted = {(a.resource, a.name, a.pattern, a.operation) for a in acls["worker"]}
    # each model's group (g1.<model>) and transactional ids (inferlog-g1.<model>-<worker>)
    assert {("group", "g1.", "prefixed", "READ"), ("transactional_id", "inferlog-g1.", "prefixed", "WRITE")} <= granted
    assert {("group", "g1", "literal", "READ"), ("transactional_id", "inferlog-g1-", "prefixed", "WRITE")} <= granted
    assert {("topic", "q.", "prefixed", "CREATE"), ("topic", "r.", "prefixed", "CREATE")} <= granted  # a new model's worker makes its topics
    assert not [a for a in acls["producer"] + acls["gateway"] if a.operation == "CREATE"]


# -- TLS ---------------------------------------------------------------------------------------
def test_sasl_ssl_needs_the_right_ca(tmp_path):
    certs = generate_certs(tmp_path / "certs")
    other_ca = generate_certs(tmp_path / "other", ca_name="someone else").cafile
    lk = LocalKafka(LIBS, tmp_path / "data", free_port(), free_port(), VERSION,
                    sasl_users={"admin": "admin-" + unique("pw")}, tls=certs)
    lk.start()
    try:
        s = lk.client_settings("admin")
        assert s.security_protocol == "SASL_SSL" and s.ssl_cafile == certs.cafile
        assert connect_error(s) is None
        name = unique("tls")
        ensure_topics(s, [name], partitions=1)
        assert produce_error(s, name) is None

        err = connect_error(s.with_overrides(ssl_cafile=other_ca))
        assert err is not None and err.code() in (KafkaError._SSL, KafkaError._TRANSPORT), err
        assert "certificate verify failed" in err.str()
    finally:
        lk.stop()

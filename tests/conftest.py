"""Shared fixtures: one real Kafka broker per test session, and per-test topics on it.

The broker is, in order: an existing cluster (KAFKA_BOOTSTRAP_SERVERS), a testcontainers
KafkaContainer when a Docker engine answers, else inferlog's LocalKafka on free ports. It starts
when the first test asks for one of KAFKA_FIXTURES (`kafka`, `broker_settings`, `topic_factory`),
directly or through another fixture.

tests/unit/ holds what needs no broker (`make test-unit`): a test there that asks for one of
KAFKA_FIXTURES is a collection error. tests/broker/ holds what needs a broker, the session's or
one of its own; tests/chaos/ the long fault runs. Helpers (support.py, tinymodels.py and this
file's unique/free_port/drop_topics) import by module name: pyproject.toml puts tests/ on the path.
"""
from __future__ import annotations

import os

# Before anything imports transformers/tokenizers: tests never reach the hub, and forked
# tokenizer pools deadlock.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import socket
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings as hypothesis_settings

# A 2-core machine shared with a broker and a model: judge properties, not generation speed.
hypothesis_settings.register_profile("inferlog", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("inferlog")

from inferlog.localkafka import LocalKafka
from inferlog.quiet import quiet_exit
from inferlog.settings import Settings, load_settings
from inferlog.topics import delete_topics, ensure_topics, partition_counts

quiet_exit()  # the engines the tests start freeze the heap, as the CLI's do

REPO = Path(__file__).resolve().parents[1]
KAFKA_FIXTURES = {"kafka", "broker_settings", "topic_factory"}  # each starts the session broker
UNIT = Path(__file__).resolve().parent / "unit"


@dataclass
class Broker:
    bootstrap: str
    local: LocalKafka | None = None  # set when this session started the broker itself


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(items):
    # Tests that touch the broker are `kafka` tests without having to say so; none of them may
    # live under tests/unit/, which runs without a broker.
    misplaced = []
    for item in items:
        wanted = sorted(KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())))
        in_unit = Path(item.path).resolve().is_relative_to(UNIT)
        if in_unit and (wanted or item.get_closest_marker("kafka")):
            misplaced.append(f"  {item.nodeid}: " + (f"asks for {', '.join(wanted)}" if wanted else "marked kafka"))
        if wanted:
            item.add_marker(pytest.mark.kafka)
    if misplaced:
        raise pytest.UsageError("tests under tests/unit/ must not need a broker (move them to tests/broker/):\n"
                                + "\n".join(misplaced))


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """The session's broker (started by the first test that asks, stopped at the session's end):
    its bootstrap address, and the LocalKafka when this session started one."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield Broker(external)
        return
    if _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        container = (KafkaContainer("confluentinc/cp-kafka:7.9.0").with_kraft()
                     .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
                     .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
                     .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false"))
        with container:
            yield Broker(container.get_bootstrap_server())
        return
    version = load_settings().kafka_version
    local = LocalKafka(libs_dir=REPO / ".kafka" / "libs" / version, data_dir=tmp_path_factory.mktemp("kafka"),
                       port=free_port(), controller_port=free_port(), version=version)
    local.fetch()
    local.start()
    try:
        yield Broker(local.bootstrap, local)
    finally:
        local.stop()


def drop_topics(bootstrap: str, names: list[str] = (), prefix: str | None = None) -> None:
    """Delete a test's topics (the named ones and those starting with `prefix`), best effort:
    never fails the test. Kept, they piled up on the session broker (1,208 partitions by the
    time test_worker ran, issue 24)."""
    s = load_settings(bootstrap_servers=bootstrap)
    try:
        if prefix:
            names = [*names, *(n for n in partition_counts(s) if n.startswith(prefix))]
        delete_topics(s, sorted(set(names)), timeout=10)
    except Exception as e:
        warnings.warn(f"test topics left on {bootstrap}: {e}")


@pytest.fixture
def topic_factory(kafka):
    """Starts the session broker if it is not up yet; make(partitions, prefix) creates a fresh
    topic on it, deleted after the test."""
    base = load_settings(bootstrap_servers=kafka.bootstrap)
    made: list[str] = []

    def make(partitions: int = 6, prefix: str = "t") -> str:
        name = unique(prefix)
        made.append(name)
        ensure_topics(base, [name], partitions=partitions)
        return name

    yield make
    drop_topics(kafka.bootstrap, made)


@pytest.fixture
def broker_settings(kafka) -> Settings:
    """Starts the session broker (see `kafka`) if it is not up yet, and makes this test's own
    topics on it: Settings naming fresh requests, high-priority, results and dead-letter topics
    (6 partitions each), a model registry topic (inferlog/registry.py), a group and a worker id;
    the topics, and any the test derived from their names, are deleted afterwards."""
    tag = unique("inferlog")
    s = load_settings(bootstrap_servers=kafka.bootstrap, requests_topic=f"{tag}.requests",
                      high_priority_topic=f"{tag}.requests.high",
                      results_topic=f"{tag}.results", deadletter_topic=f"{tag}.deadletter",
                      models_topic=f"{tag}.models", partitions=6, group_id=f"{tag}.workers", worker_id=f"{tag}.w0")
    try:
        ensure_topics(s)
        yield s
    finally:
        drop_topics(kafka.bootstrap, prefix=f"{tag}.")  # with what the test derived from them


@pytest.fixture
def tokenizer_loads(monkeypatch):
    """Spies on AutoTokenizer.from_pretrained: the paths it loaded, each load held until `release` is set."""
    from transformers import AutoTokenizer

    real, loads, release = AutoTokenizer.from_pretrained, [], threading.Event()

    def spy(path, *a, **kw):
        loads.append(str(path))
        assert release.wait(60), "the test never released the tokenizer's load"
        return real(path, *a, **kw)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    return loads, release

"""Topic admin and the `inferlog kafka` CLI without a broker: retries of what Kafka calls "not
yet", a controller not ready while topics are created, the CLI's help. tests/broker/test_localkafka.py
runs the local broker, topic admin and the CLI against a real broker."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from confluent_kafka import KafkaError, KafkaException

from inferlog import clients, topics
from inferlog.cli import cli
from inferlog.clients import retry
from inferlog.settings import load_settings
from inferlog.topics import ensure_topics


def failing(*codes):
    """A call that raises KafkaException(code) for each code in turn, then returns 'ok'."""
    left = list(codes)

    def call():
        if left:
            raise KafkaException(KafkaError(left.pop(0)))
        return "ok"
    return call


def test_retry_waits_out_what_kafka_calls_not_yet(monkeypatch):
    monkeypatch.setattr(clients.time, "sleep", lambda s: None)
    assert retry(failing(KafkaError._UNKNOWN_PARTITION, KafkaError._DESTROY_BROKER, KafkaError._TIMED_OUT), "x") == "ok"
    with pytest.raises(KafkaException):  # not retriable: at once
        retry(failing(KafkaError.INVALID_REPLICATION_FACTOR), "x")
    with pytest.raises(KafkaException):  # out of tries
        retry(failing(*[KafkaError.NOT_CONTROLLER] * 3), "x", tries=3)


class Settled:
    def __init__(self, error=None):
        self.error = error

    def result(self):
        if self.error is not None:
            raise KafkaException(KafkaError(self.error))


def test_ensure_topics_retries_a_controller_not_ready(monkeypatch):
    # The first try creates 'a' and times out on 'b' (which the controller made anyway, as
    # the second try finds): both count as created, and the second try asks only for 'b'.
    answers = [{"a": None, "b": KafkaError._TIMED_OUT}, {"b": KafkaError.TOPIC_ALREADY_EXISTS}]
    asked = []

    class Admin:
        def create_topics(self, new, **kw):
            asked.append([t.topic for t in new])
            return {n: Settled(e) for n, e in answers.pop(0).items()}

        def list_topics(self, timeout):
            part = type("P", (), {"leader": 1})()
            topic = type("T", (), {"error": None, "partitions": {0: part}})()
            return type("M", (), {"topics": {"a": topic, "b": topic}})()

    monkeypatch.setattr(topics, "_admin", lambda s: Admin())
    monkeypatch.setattr(clients.time, "sleep", lambda s: None)
    assert ensure_topics(load_settings(), ["a", "b"]) == {"a": True, "b": True}
    assert asked == [["a", "b"], ["b"]]


def test_cli_help_lists_subcommands():
    out = CliRunner().invoke(cli, ["kafka", "--help"]).output
    for sub in ("fetch", "start", "stop", "status", "topics"):
        assert sub in out

"""Chaos fixtures: the tiny classifier the worker processes serve (built once per session), and a
broker of a test's own, to stop or kill without disturbing the session's broker."""
import pytest

from conftest import REPO, free_port
from inferlog.localkafka import LocalKafka
from inferlog.settings import load_settings
from tinymodels import tiny_bert_classifier_dir  # noqa: F401  (fixture)


@pytest.fixture
def own_broker(tmp_path):
    """Free ports and its own data dir, which survives a restart as a real broker's disk does."""
    version = load_settings().kafka_version
    broker = LocalKafka(libs_dir=REPO / ".kafka" / "libs" / version, data_dir=tmp_path / "kafka",
                        port=free_port(), controller_port=free_port(), version=version)
    broker.fetch()
    broker.start(timeout=180)
    try:
        yield broker
    finally:
        broker.stop()

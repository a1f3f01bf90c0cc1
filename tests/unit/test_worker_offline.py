"""The worker's exit status without a broker: committed offsets that stay unreadable (not a
FatalError of their own, inferlog/errors.py) stop it as a fatal error does, with 3."""
from __future__ import annotations

import pytest

from inferlog.consumer.runners import load_runner
from inferlog.consumer.worker import Worker
from inferlog.errors import FatalError, OffsetsUnreadable
from inferlog.settings import Settings
from tinymodels import tiny_bert_classifier_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def classifier(tiny_bert_classifier_dir):
    return load_runner(str(tiny_bert_classifier_dir), device="cpu")


@pytest.mark.parametrize("error, code", [
    (OffsetsUnreadable("cannot read the committed offsets after 180s: COORDINATOR_NOT_AVAILABLE"), 3),
    (FatalError("the device failed"), 3),
])
def test_what_stops_the_worker_and_its_exit_status(classifier, monkeypatch, error, code):
    """Raised from a turn of the loop, as from _on_assign inside consume() or a rewind."""
    assert not isinstance(OffsetsUnreadable("x"), FatalError)
    w = Worker(Settings(stages="inline"), classifier)
    monkeypatch.setattr(w, "_connect", lambda: None)  # no broker: the loop's first turn raises

    def step():
        raise error

    monkeypatch.setattr(w, "_step", step)
    assert w.run() == code
    assert not w.ready.is_set()

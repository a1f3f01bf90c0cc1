"""The broker goes away mid-stream and comes back: the workers ride it out.

A broker of its own (free ports, own data dir), so the session's broker and the tests on
it are undisturbed. The data dir survives the restart, as a real broker's disk does.
"""
from __future__ import annotations

import random
import time

import pytest


from .harness import Fleet, Stream, check_exactly_once, own_topics, wait_all_answered


@pytest.mark.parametrize("size", [
    pytest.param({"n": 1500, "rate": 50, "outages": 1, "down_s": (4, 8)}, id="short"),
    pytest.param({"n": 10000, "rate": 60, "outages": 4, "down_s": (3, 20)}, id="long", marks=pytest.mark.slow)])
def test_broker_stop_and_start_mid_stream(own_broker, tiny_bert_classifier_dir, tmp_path, size):
    s = own_topics(own_broker.bootstrap, "bounce")
    rng = random.Random(3)
    logs = tmp_path / "logs"
    logs.mkdir()
    fleet = Fleet(s, tiny_bert_classifier_dir, logs)
    try:
        fleet.start_joined("w0", "w1")
        with Stream(s, size["n"], size["rate"]) as stream:
            gap = stream.n / stream.rate / (size["outages"] + 1)
            for _ in range(size["outages"]):
                time.sleep(rng.uniform(0.5, 1.0) * gap)
                own_broker.stop()
                time.sleep(rng.uniform(*size["down_s"]))
                own_broker.start(timeout=180)
                for wid, p in fleet.live.items():  # nobody gave up while the broker was away
                    assert p.poll() is None, f"{wid} exited {p.returncode}:\n{fleet.log(p)[-4000:]}"
        wait_all_answered(s, size["n"], timeout=300)
        fleet.stop_all()
    finally:
        fleet.kill_all()
    check_exactly_once(s, stream.ids, "broker stop/start", events=size["outages"])

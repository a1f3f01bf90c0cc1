"""Zombies: a worker that lives on after its successor took over must not commit anything twice."""
from __future__ import annotations

import signal
import time

import pytest

from support import wait_until

from .harness import Fleet, Stream, check_exactly_once, wait_all_answered

SIZES = pytest.mark.parametrize("size", [pytest.param({"n": 1200, "rate": 60}, id="short"),
                                         pytest.param({"n": 10000, "rate": 80}, id="long", marks=pytest.mark.slow)])


@SIZES
def test_same_transactional_id_fences_the_older_worker(broker_settings, tiny_bert_classifier_dir, tmp_path, size):
    """B starts with A's worker id: B's init_transactions bumps the producer epoch, and A's next
    commit is refused (fenced): A exits 3 with nothing of its open transaction visible."""
    fleet = Fleet(broker_settings, tiny_bert_classifier_dir, tmp_path)
    try:
        a = fleet.start("wz")
        wait_until(lambda: fleet.joined("wz"), timeout=120, what="A to join")
        # both tiers get requests: after B joins, A may keep only one topic's partitions, and
        # it learns it is fenced only at its next commit, so those partitions must see traffic
        with Stream(broker_settings, size["n"], size["rate"], high_every=4) as stream:
            time.sleep(size["n"] / size["rate"] / 4)
            fleet.live.pop("wz")
            fleet.start_joined("wz")  # B
        # A learns it is fenced at its next commit, so its partitions need traffic after B got
        # its own: on a loaded machine B may join after the first stream ended
        with Stream(broker_settings, 400, 40, start=size["n"], high_every=4) as tail:
            assert a.wait(120) == 3, f"the fenced worker exited {a.returncode}:\n{fleet.log(a)[-4000:]}"
            assert "fatal" in fleet.log(a) and "fenced" in fleet.log(a).lower()
        wait_all_answered(broker_settings, size["n"] + tail.n)
        fleet.stop_all()
    finally:
        fleet.kill_all()
    check_exactly_once(broker_settings, stream.ids + tail.ids, "zombie: same transactional.id (fenced, exit 3)",
                       events=1)


@SIZES
@pytest.mark.parametrize("protocol", ["consumer", "classic"])
def test_a_paused_worker_past_its_session_is_fenced_by_the_generation(broker_settings, tiny_bert_classifier_dir,
                                                                     tmp_path, size, protocol):
    """SIGSTOP A past its session timeout: its partitions move to B. SIGCONT: A's late commits
    carry a stale generation or member epoch and are refused; A rejoins or exits, cleanly.

    On SIGCONT, A usually fetches the backlog that built up while it was stopped and pauses its
    normal tier before it learns it lost its partitions. Under KIP-848 it then gets the same
    partitions back a second later; librdkafka had kept them paused, and they were never
    fetched again (records unanswered for 240 s in 2 of 4 runs) until the worker resumed what
    it gives up."""
    fleet = Fleet(broker_settings, tiny_bert_classifier_dir, tmp_path, INFERLOG_GROUP_PROTOCOL=protocol)
    try:
        fleet.start_joined("wa", "wb")
        with Stream(broker_settings, size["n"], size["rate"]) as stream:
            pauses = max(1, size["n"] // 3000)
            for _ in range(pauses):
                time.sleep(size["n"] / size["rate"] / (pauses + 2))
                a = fleet.signal("wa", signal.SIGSTOP)
                time.sleep(6 + 5)  # session.timeout.ms is 6 s in the harness
                a.send_signal(signal.SIGCONT)
        wait_all_answered(broker_settings, size["n"])
        if a.poll() is not None:  # it may stop itself; then only as a fenced worker
            assert a.returncode == 3, fleet.log(a)[-4000:]
            fleet.live.pop("wa")
        fleet.stop_all()
    finally:
        fleet.kill_all()
    log = fleet.log(a)
    check_exactly_once(broker_settings, stream.ids, "zombie: SIGSTOP past session, SIGCONT", events=pauses,
                       zombie_exit=a.returncode, zombie_aborts=log.count("commit aborted"))

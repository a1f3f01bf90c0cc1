"""Workers die and come and go while requests stream in: nothing is lost, nothing doubles.

Each test has a short form (the normal run) and a long one (`make chaos`, -m slow).
"""
from __future__ import annotations

import random
import signal
import time

import pytest

from .harness import Fleet, Stream, check_exactly_once, wait_all_answered

SHORT, LONG = 1500, 10000


def sizes(short_kw: dict, long_kw: dict):
    return pytest.mark.parametrize("size", [pytest.param(short_kw, id="short"),
                                            pytest.param(long_kw, id="long", marks=pytest.mark.slow)])


def chaos_loop(stream: Stream, rng: random.Random, events: int, act) -> int:
    """Call act() `events` times at seeded random moments spread over the stream's life."""
    gap = stream.n / stream.rate / (events + 1)
    done = 0
    for _ in range(events):
        time.sleep(rng.uniform(0.5, 1.5) * gap)
        act()
        done += 1
    return done


@sizes({"n": SHORT, "rate": 60, "kills": 5}, {"n": LONG, "rate": 80, "kills": 30})
def test_sigkill_at_random_moments_then_restart(broker_settings, tiny_bert_classifier_dir, tmp_path, size):
    rng = random.Random(7)
    fleet = Fleet(broker_settings, tiny_bert_classifier_dir, tmp_path)
    try:
        fleet.start_joined("w0", "w1")
        with Stream(broker_settings, size["n"], size["rate"]) as stream:
            def kill():
                # the same id comes back: its init_transactions aborts what the dead one left open
                wid = rng.choice(sorted(fleet.live))
                fleet.signal(wid, signal.SIGKILL).wait(10)
                fleet.start(wid)

            kills = chaos_loop(stream, rng, size["kills"], kill)
        wait_all_answered(broker_settings, size["n"])
        fleet.stop_all()
    finally:
        fleet.kill_all()
    check_exactly_once(broker_settings, stream.ids, "SIGKILL + restart", events=kills)


@sizes({"n": SHORT, "rate": 60, "moves": 6}, {"n": LONG, "rate": 80, "moves": 40})
def test_rebalance_storm(broker_settings, tiny_bert_classifier_dir, tmp_path, size):
    """Members join and leave every few seconds (SIGTERM: drain, commit, leave, exit 0)."""
    rng = random.Random(11)
    fleet = Fleet(broker_settings, tiny_bert_classifier_dir, tmp_path)
    next_id = iter(range(1000))
    try:
        fleet.start_joined(*(f"w{next(next_id)}" for _ in range(2)))
        with Stream(broker_settings, size["n"], size["rate"]) as stream:
            def move():
                # only members that joined: before that the default SIGTERM action ends a
                # process that holds nothing yet, and the clean-drain contract starts at the join
                joined = sorted(w for w in fleet.live if fleet.joined(w))
                if len(joined) > 1 and (len(fleet.live) > 2 or rng.random() < 0.5):
                    p = fleet.signal(rng.choice(joined), signal.SIGTERM)
                    code = p.wait(90)
                    assert code == 0, f"a SIGTERM'd worker exited {code}:\n{fleet.log(p)[-4000:]}"
                else:
                    fleet.start(f"w{next(next_id)}")

            moves = chaos_loop(stream, rng, size["moves"], move)
        wait_all_answered(broker_settings, size["n"])
        fleet.stop_all()
    finally:
        fleet.kill_all()
    check_exactly_once(broker_settings, stream.ids, "rebalance storm (SIGTERM/join)", events=moves)

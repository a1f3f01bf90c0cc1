"""Model faults and slow batches at random while requests stream in: each faulty request is
isolated by the batch split and dead-lettered (MODEL_ERROR), every other one answered."""
from __future__ import annotations

import pytest

from inferlog.consumer.faults import FaultyRunner
from inferlog.consumer.runners import load_runner

from .harness import Fleet, Stream, check_exactly_once, wait_all_answered

RATE, SEED = 0.02, 5


@pytest.mark.parametrize("size", [pytest.param({"n": 1500, "rate": 100}, id="short"),
                                  pytest.param({"n": 12000, "rate": 100}, id="long", marks=pytest.mark.slow)])
def test_random_model_faults_and_slow_batches(broker_settings, tiny_bert_classifier_dir, tmp_path, size):
    fleet = Fleet(broker_settings, tiny_bert_classifier_dir, tmp_path, INFERLOG_FAULT_RATE=RATE,
                  INFERLOG_FAULT_SEED=SEED, INFERLOG_FAULT_SLOW_MS=400, INFERLOG_FAULT_SLOW_RATE=0.05)
    try:
        fleet.start_joined("w0", "w1")
        with Stream(broker_settings, size["n"], size["rate"]) as stream:
            pass
        wait_all_answered(broker_settings, size["n"])
        fleet.stop_all()
    finally:
        fleet.kill_all()
    # the same decision the workers made, from the same tokenizer
    judge = FaultyRunner(load_runner(str(tiny_bert_classifier_dir), device="cpu"), rate=RATE, seed=SEED)
    ids = judge.tokenize([stream.texts[r] for r in stream.ids])
    faulty = {rid for rid, row in zip(stream.ids, ids) if judge.faulty(row)}
    assert 0 < len(faulty) < len(stream.ids) * RATE * 2
    slow = sum(fleet.log(p).count("retrying as two halves") for _, p, _ in fleet.all)
    check_exactly_once(broker_settings, stream.ids, f"model faults (p={RATE}/request) + slow batches",
                       expect_dead=faulty, batch_splits=slow)


def test_a_stuck_send_offsets_restarts_the_process_and_loses_nothing(broker_settings, tiny_bert_classifier_dir,
                                                                     tmp_path):
    """librdkafka#5456: send_offsets_to_transaction can hang past its timeout. Both workers' 5th
    commit hangs (injected): each process starts itself again under its own id (exec, same pid),
    whose init_transactions aborts the open transaction, and the partitions are redone from the
    committed offsets; the stuck producer is never replaced inside the process (issue 24)."""
    fleet = Fleet(broker_settings, tiny_bert_classifier_dir, tmp_path, INFERLOG_FAULT_STUCK_COMMIT=5,
                  INFERLOG_TRANSACTION_TIMEOUT_MS=6000)
    try:
        fleet.start_joined("w0", "w1")
        pids = {w: p.pid for w, p in fleet.live.items()}
        with Stream(broker_settings, 800, 40, high_every=4) as stream:
            pass
        wait_all_answered(broker_settings, stream.n)
        assert {w: p.pid for w, p in fleet.live.items() if p.poll() is None} == pids  # nobody left
        restarted = [w for w, p in fleet.live.items() if "restarting worker" in fleet.log(p)]
        fleet.stop_all()
    finally:
        fleet.kill_all()
    assert restarted, "no commit hung: the fault was not injected"
    check_exactly_once(broker_settings, stream.ids, "stuck send_offsets (restart in place)", events=len(restarted))

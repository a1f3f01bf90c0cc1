"""Outputs the producer refuses for good (consumer/emit.py `Refusals`), no broker.

`Refusals` is pure: delivery reports in, a decision out. A record refused within a batch is only a
suspect (the broker refuses a whole batch for one record too large), produced alone next time;
one refused alone is replaced by its small dead letter. tests/broker/test_refusals_broker.py commits
one such output through `TransactionalEmitter` on a real broker.
"""
from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, Message

from inferlog.consumer.emit import REFUSED, Refusals
from inferlog.consumer.records import Out

TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
WHY = f"{TOO_LARGE.name()}: {TOO_LARGE.str()}"


def out(i: int, source: bool = True) -> Out:
    return Out("results", f"key-{i}".encode(), f"value-{i}".encode(), [], "OK",
               source=("requests", 0, 100 + i) if source else None)


def report(o: Out) -> Message:
    """The message a delivery report names: what was produced of `o`."""
    return Message(topic=o.topic, partition=0, key=o.key, value=o.value)


class Fallback:
    """Records each replacement asked for; the replacement is a distinct dead letter."""

    def __init__(self):
        self.asked: list[tuple[Out, str]] = []

    def __call__(self, o: Out, why: str) -> Out:
        self.asked.append((o, why))
        return o._replace(topic="deadletter", value=b"dead:" + o.value, dead=True, label="OUTPUT_UNWRITABLE")


def refuse(r: Refusals, *indices: int) -> None:
    for i in indices:
        r.on_delivery(TOO_LARGE, report(r.outputs[i]))


# -- delivery reports ------------------------------------------------------------------------
@pytest.mark.parametrize("code", sorted(REFUSED))
def test_a_refusal_for_good_is_recorded_with_its_name_and_not_as_an_error(code):
    r = Refusals([out(0)], Fallback())
    err = KafkaError(code)
    r.on_delivery(err, report(r.outputs[0]))
    assert r.errors == []
    assert len(r.refused) == 1 and r.refused[0][1] == f"{err.name()}: {err.str()}"


@pytest.mark.parametrize("code", [KafkaError._MSG_TIMED_OUT, KafkaError.NOT_LEADER_FOR_PARTITION,
                                  KafkaError._PURGE_QUEUE, KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                  KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER])
def test_any_other_delivery_error_is_an_error_not_a_refusal(code):
    """Those may pass on a retry or are the commit's failure: never a reason to replace an output."""
    r = Refusals([out(0)], Fallback())
    r.on_delivery(KafkaError(code), report(r.outputs[0]))
    assert r.refused == [] and [e.code() for e in r.errors] == [code]
    assert r.settle() == []  # nothing was refused: nothing to produce again, nothing replaced


def test_a_delivered_message_records_nothing():
    r = Refusals([out(0)], Fallback())
    r.on_delivery(None, report(r.outputs[0]))
    assert r.refused == [] and r.errors == []


# -- settle ----------------------------------------------------------------------------------
def test_refused_within_a_batch_is_a_suspect_then_replaced_only_if_refused_alone():
    """A batch of three refused: all three are produced again, each alone, none replaced. Then
    only the one refused alone is replaced by its fallback, carrying the refusal's reason."""
    fb = Fallback()
    r = Refusals([out(0), out(1), out(2)], fb)
    original = list(r.outputs)
    refuse(r, 0, 1, 2)
    r.on_delivery(KafkaError(KafkaError._PURGE_QUEUE), report(original[2]))  # an error beside them
    assert r.settle() == [0, 1, 2]
    assert r.alone == {0, 1, 2} and r.outputs == original and fb.asked == []
    assert r.refused == [] and r.errors == []  # each attempt starts with none

    refuse(r, 1)  # the next attempt: each alone, and only the culprit refused
    assert r.settle() == [1]
    assert fb.asked == [(original[1], f"the output could not be written: {WHY}")]
    assert r.outputs[1].topic == "deadletter" and r.outputs[1].value == b"dead:value-1"
    assert [r.outputs[0], r.outputs[2]] == [original[0], original[2]]
    assert r.alone == {0, 2}  # the replacement goes with the others; the suspects stay alone


def test_refused_by_produce_itself_is_replaced_at_once_and_keeps_the_attempts_reports():
    """librdkafka refuses a record too large for it at produce(): that output's dead letter
    replaces it at once. Delivery reports recorded earlier in the same attempt (a refusal of
    another output, an error) are kept for the attempt's end: clearing them there let an
    at-least-once commit go on as if those outputs had been delivered."""
    fb = Fallback()
    r = Refusals([out(0), out(1), out(2)], fb)
    r.on_delivery(TOO_LARGE, Message(topic="results", key=out(0).key, value=out(0).value))
    r.on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)
    assert r.replace(1, WHY)
    assert r.outputs[1].dead and len(fb.asked) == 1 and 1 not in r.alone
    assert r.outputs[0] == out(0) and r.outputs[2] == out(2)
    assert len(r.refused) == 1 and len(r.errors) == 1  # still there for the attempt's end
    assert not Refusals([out(0)], None).replace(0, WHY)  # no fallback: the caller fails as before


@pytest.mark.parametrize("why", ["no fallback", "an output without a source", "a report naming no output"])
def test_when_nothing_can_be_done_settle_returns_nothing_and_changes_nothing(why):
    """[]: the caller fails the commit as it would without Refusals; no output is replaced and
    no suspect is made."""
    fb = Fallback()
    outputs = [out(0), out(1, source=why != "an output without a source")]
    r = Refusals(outputs, None if why == "no fallback" else fb)
    original = list(outputs)
    if why == "a report naming no output":
        r.on_delivery(TOO_LARGE, Message(topic="results", key=b"other", value=b"other"))
    refuse(r, 0, 1)
    r.alone.add(0)  # produced alone already: would be replaced if anything could be done
    assert r.settle() == []
    assert r.outputs == original and r.alone == {0} and fb.asked == []
    assert r.refused == []


def test_tries_left_covers_the_worst_case_and_no_more():
    """Worst case in a transaction: all n outputs refused as one batch, then one suspect refused
    alone per attempt (the first refusal ends an attempt). Each failed attempt has a try left,
    the attempt after the last replacement is the last one allowed."""
    n = 4
    fb = Fallback()
    r = Refusals([out(i) for i in range(n)], fb)
    refuse(r, *range(n))  # attempt 1
    assert r.settle() == list(range(n)) and r.tries_left(1)
    for attempt in range(2, n + 2):  # attempts 2..n+1: one suspect refused alone each
        culprit = attempt - 2
        refuse(r, culprit)
        assert r.tries_left(attempt) and r.settle() == [culprit]
    assert len(fb.asked) == n and all(o.dead for o in r.outputs)  # attempt n+2 writes only dead letters
    assert not r.tries_left(n + 2)  # and should that fail too, the commit fails

"""`inferlog demo`, the README's first command, end to end on the test broker with the default
model: a broker that answers is used as it is (no local one started), every sample request is
answered on the results topic, and the summary says so."""
from __future__ import annotations

from click.testing import CliRunner

from inferlog.cli import cli
from inferlog.codec import RESULT, Codec
from support import read_all

N = 48


def test_the_demo_answers_every_sample_request(broker_settings):
    s = broker_settings
    env = {"INFERLOG_HIGH_PRIORITY_TOPIC": s.high_priority_topic, "INFERLOG_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    res = CliRunner().invoke(cli, ["demo", "--bootstrap-servers", s.bootstrap_servers,
                                   "--requests-topic", s.requests_topic, "--results-topic", s.results_topic,
                                   "--deadletter-topic", s.deadletter_topic, "--group-id", s.group_id,
                                   "--count", str(N), "--show", "3"], env=env)
    assert res.exit_code == 0, res.output + str(res.exception)
    assert "starting a local Kafka" not in res.output  # the broker that answered was used
    assert f"{N} results for {N} requests (0 dead letters" in res.output, res.output
    codec = Codec.from_settings(s)
    results = [codec.decode(r.value, expect=RESULT) for r in read_all(s, s.model_results_topic)]
    assert len(results) == N and {r["status"] for r in results} == {"OK"}
    assert {len(r["outputs"][0]["vector"]) for r in results} == {384}  # all-MiniLM-L6-v2
    assert not read_all(s, s.model_deadletter_topic)

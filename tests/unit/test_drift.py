"""The drift report without a broker: results built as the decoder (or `row_result`) yields
them, compared and formatted. A dimension mismatch is its own outcome, never a cosine; only
requests that differ beyond the tolerances are listed as divergent."""
from __future__ import annotations

import json
import math

import pytest

from inferlog.replay import drift


def result(rid: str, outputs: list[dict], *, task: str = "EMBED", status: str = "OK", model: str = "m",
           offset: int = 0) -> dict:
    return {"request_id": rid, "task": task, "status": status, "outputs": outputs,
            "model": {"name": model, "revision": None, "digest": None},
            "source": {"topic": "req", "partition": 0, "offset": offset}, "timings": {"created_at": 1},
            "replay_run_id": None}


def vec(dim: int, seed: int) -> list[float]:
    v = [math.sin(seed * 7.3 + i * 1.1) for i in range(dim)]
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def embeds(*vectors: list[float]) -> list[dict]:
    return [{"vector": v} for v in vectors]


def originals(n: int, dim: int = 384) -> list[dict]:
    return [result(f"r{i:02d}", embeds(vec(dim, i)), model="all-MiniLM-L6-v2", offset=i) for i in range(n)]


def replay_of(orig: list[dict], change=lambda i, v: v, *, model: str = "m") -> list[dict]:
    return [result(r["request_id"], embeds(*(change(i, o["vector"]) for o in r["outputs"])), model=model,
                   offset=r["source"]["offset"]) for i, r in enumerate(orig)]


def nudged(v: list[float], eps: float) -> list[float]:
    return [x + eps * (-1) ** j for j, x in enumerate(v)]


def report_of(orig, rep, **kw) -> tuple[dict, str]:
    report = drift.compare(orig, rep, **kw)
    json.dumps(report, allow_nan=False)  # plain JSON, as --format json prints it
    return report, drift.format_report(report)


def test_dimension_mismatch_is_its_own_outcome_not_a_cosine():
    orig = originals(12)
    rep = [result(r["request_id"], embeds(vec(32, i)), model="tiny-32", offset=i) for i, r in enumerate(orig)]
    report, table = report_of(orig, rep)
    t = report["tasks"]["EMBED"]
    assert (t["compared"], t["exact"], t["dimension_mismatch"]) == (12, 0, 12)
    assert t["mismatched_dims"] == {"384 vs 32": 12}
    assert "cosine" not in t and "close" not in t and "max_abs_diff" not in t
    assert report["differing"] == 12 and len(report["most_divergent"]) == 10
    assert {d["outcome"] for d in report["most_divergent"]} == {"dimension_mismatch"}
    assert {d["detail"] for d in report["most_divergent"]} == {"dimension mismatch 384 vs 32"}
    assert "EMBED dimension mismatch: 12 (384 vs 32, original vs replay;" in table
    assert "cosine 0" not in table and "EMBED cosine" not in table
    assert "most divergent (10 shown; 12 of 12 compared differ):" in table


def test_some_requests_of_another_width_leave_the_rest_compared_by_cosine():
    orig = originals(5)
    rep = replay_of(orig, lambda i, v: vec(32, i) if i in (1, 3) else v)
    report, table = report_of(orig, rep)
    t = report["tasks"]["EMBED"]
    assert (t["compared"], t["exact"], t["dimension_mismatch"]) == (5, 3, 2)
    assert t["cosine"]["eq_1"] == 3 and t["cosine"]["lt_1"] == 0 and t["cosine"]["min"] > 1 - 1e-12
    assert [d["request_id"] for d in report["most_divergent"]] == ["r01", "r03"]
    assert "EMBED dimension mismatch: 2" in table and "EMBED cosine  min 1.000000" in table


def test_several_dimension_pairs_are_each_counted():
    orig = originals(3) + [result("w", embeds(vec(768, 9)))]
    rep = replay_of(orig, lambda i, v: vec(32, i))
    t = drift.compare(orig, rep)["tasks"]["EMBED"]
    assert t["mismatched_dims"] == {"384 vs 32": 3, "768 vs 32": 1}
    assert "EMBED dimension mismatch: 4 (384 vs 32: 3, 768 vs 32: 1, original vs replay;" in drift.format_report(drift.compare(orig, rep))


def test_identical_results_list_no_divergent_request():
    orig = originals(12)
    report, table = report_of(orig, replay_of(orig))
    t = report["tasks"]["EMBED"]
    assert (t["compared"], t["exact"], t["differing"]) == (12, 12, 0)
    assert report["most_divergent"] == [] and report["differing"] == 0
    assert t["cosine"]["eq_1"] == 12 and t["cosine"]["min"] <= 1.0
    assert table.splitlines()[-1] == "most divergent: none (all 12 compared exact)"
    assert "request_id" not in table


def test_float_rounding_is_within_tolerance_not_divergence():
    orig = originals(6)
    report, table = report_of(orig, replay_of(orig, lambda i, v: nudged(v, 1e-7)))
    t = report["tasks"]["EMBED"]
    assert t["exact"] == 0 and t["close"] == 6 and t["cosine"]["eq_1"] == 6
    assert report["most_divergent"] == []
    assert table.splitlines()[-1] == "most divergent: none (all 6 compared within tolerance, 0 exact)"


def test_only_requests_that_differ_are_listed_most_divergent_first():
    orig = originals(8)
    eps = {2: 1e-2, 5: 1e-1, 6: 1e-3, 7: 1e-7}  # 7: float rounding only
    report, table = report_of(orig, replay_of(orig, lambda i, v: nudged(v, eps[i]) if i in eps else v))
    listed = report["most_divergent"]
    assert [d["request_id"] for d in listed] == ["r05", "r02", "r06"]
    assert [d["divergence"] for d in listed] == sorted((d["divergence"] for d in listed), reverse=True)
    assert all(d["divergence"] > 0 and d["outcome"] == "differs" for d in listed)
    assert report["differing"] == report["tasks"]["EMBED"]["differing"] == 3
    assert "most divergent (3 of 8 compared differ):" in table
    assert "r05" in table and "r07" not in table and "r00" not in table

    report, table = report_of(orig, replay_of(orig, lambda i, v: nudged(v, eps[i]) if i in eps else v), top=2)
    assert [d["request_id"] for d in report["most_divergent"]] == ["r05", "r02"] and report["differing"] == 3
    assert "most divergent (2 shown; 3 of 8 compared differ):" in table


def test_zero_vectors_have_no_cosine():
    assert drift._cosine([0.0, 0.0], [1.0, 0.0]) is None
    assert drift._cosine([0.0, 0.0], [0.0, 0.0]) is None
    assert drift._cosine([1.0, 2.0], [1.0]) is None
    assert all(-1.0 <= drift._cosine(v, w) <= 1.0 for v in ([1e-3, 3.0], [7.0, 7.0]) for w in ([7.0, 7.0], [-7.0, -7.0]))
    orig = originals(3) + [result("z", embeds([0.0] * 384))]
    rep = replay_of(orig, lambda i, v: [0.0] * 384 if i == 1 else v)  # r01 collapses; z stays zero on both sides
    report, table = report_of(orig, rep)
    t = report["tasks"]["EMBED"]
    assert t["zero_vector"] == 2 and t["cosine"]["eq_1"] == 2 and t["cosine"]["lt_1"] == 0
    assert t["close"] == 3 and t["max_abs_diff"] > 0
    assert [(d["request_id"], d["outcome"]) for d in report["most_divergent"]] == [("r01", "zero_vector")]
    assert report["most_divergent"][0]["detail"].startswith("zero vector in replay: cosine undefined")
    assert "EMBED zero vector: 2 (cosine undefined" in table and "cosine 0" not in table


def test_non_finite_vectors_are_not_called_similar():
    orig = originals(2)
    report, _ = report_of(orig, replay_of(orig, lambda i, v: [math.nan] * len(v) if i else v))
    assert [d["request_id"] for d in report["most_divergent"]] == ["r01"]
    assert report["most_divergent"][0]["detail"] == "non-finite value in replay: cosine undefined"
    assert report["tasks"]["EMBED"]["cosine"]["eq_1"] == 1 and report["tasks"]["EMBED"]["cosine"]["lt_1"] == 0


def test_another_number_of_outputs_is_counted_and_listed():
    orig = [result("a", embeds(vec(8, 1), vec(8, 2))), result("b", embeds(vec(8, 3)))]
    rep = [result("a", embeds(vec(8, 1))), result("b", embeds(vec(8, 3)))]
    report, table = report_of(orig, rep)
    t = report["tasks"]["EMBED"]
    assert (t["output_count_mismatch"], t["status_mismatch"], t["cosine"]["eq_1"]) == (1, 0, 1)
    assert [(d["request_id"], d["detail"], d["outcome"]) for d in report["most_divergent"]] == [
        ("a", "2 -> 1 outputs", "output_count_mismatch")]
    assert "EMBED output count mismatch: 1" in table


def test_a_status_change_is_not_an_output_count_mismatch():
    orig = [result("a", embeds(vec(8, 1)))]
    rep = [result("a", [], status="EXPIRED")]
    t = drift.compare(orig, rep)["tasks"]["EMBED"]
    assert (t["status_mismatch"], t["output_count_mismatch"], t["differing"]) == (1, 0, 1)
    assert "cosine" not in t


@pytest.mark.parametrize("task, same, close, apart", [
    ("CLASSIFY", {"label": "pos", "score": 0.9, "scores": {"pos": 0.9, "neg": 0.1}},
     {"label": "pos", "score": 0.9 + 1e-7, "scores": {"pos": 0.9 + 1e-7, "neg": 0.1 - 1e-7}},
     {"label": "neg", "score": 0.6, "scores": {"pos": 0.4, "neg": 0.6}}),
    ("GENERATE", {"text": "the fox", "tokens": 2, "finish_reason": "stop"},
     {"text": "the fox", "tokens": 2, "finish_reason": "stop"},
     {"text": "the cat", "tokens": 2, "finish_reason": "stop"}),
])
def test_other_tasks_list_only_what_differs(task, same, close, apart):
    orig = [result(r, [same], task=task, offset=i) for i, r in enumerate("abc")]
    rep = [result("a", [same], task=task), result("b", [close], task=task, offset=1),
           result("c", [apart], task=task, offset=2)]
    report, table = report_of(orig, rep)
    assert [d["request_id"] for d in report["most_divergent"]] == ["c"]
    assert report["tasks"][task]["differing"] == 1
    assert "most divergent (1 of 3 compared differ):" in table

    report, table = report_of(orig, orig)
    assert report["most_divergent"] == [] and "most divergent: none (all 3 compared exact)" in table

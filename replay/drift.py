"""Drift: how a replay's results differ from the results originally emitted.

The originals are the live results (replay_run_id null) whose source position (topic,
partition, offset: on either tier's request topic) lies in the replayed window, read from
the results topic of the window's model (results_topic.<model>: the model whose request
topics were replayed, results_topics) over the window's time span plus a margin (a result is
written after its request, later when the workers lagged). The two sides
are joined by request_id and compared per task: embeddings by cosine similarity,
classifications by label, generations by text.
"""
from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from inferlog.codec import DEADLETTER, RESULT, Codec
from inferlog.request import now_ms
from inferlog.topics import output_topics, partition_counts

from .sinks import read_rows, row_result
from .window import Window, WindowError, WindowReader, read_window, resolve_window, settle

CLOSE = 1e-4  # largest absolute difference of an embedding component still called "close"
ONE = 1e-6  # cosine within this of 1 counts as "== 1" (float32 vectors never sum exactly)


# -- collecting both sides ---------------------------------------------------------------------
def _in_window(window: Window, src: dict) -> bool:
    return window.contains(src["topic"], src["partition"], src["offset"])


def read_results(settings, topic: str | Sequence[str], *, since_ms: int | None = None,
                 until_ms: int | None = None) -> list[dict]:
    """Decoded results of a results topic, or of several (read_committed), optionally narrowed by time."""
    w = resolve_window(settings, topic, since=since_ms, until=until_ms)
    codec = Codec.from_settings(settings)
    out = []
    for m in read_window(settings, w):
        name, rec = codec.decode_named(m.value())
        if name == RESULT:
            out.append(rec)
    return out


def read_dead_letters(settings, topic: str) -> list[dict]:
    codec = Codec.from_settings(settings)
    return [codec.decode(m.value(), expect=DEADLETTER) for m in read_window(settings, resolve_window(settings, topic))]


def time_span(window: Window, replayed: list[dict], margin_ms: int) -> tuple[int | None, int | None]:
    """The span of the results topic that holds the originals: the window's time edges, or
    the requests' creation times when the window was given by offsets."""
    created = [r["timings"]["created_at"] for r in replayed if r.get("timings")]
    since = window.since_ms if window.since_ms is not None else (min(created) if created else None)
    until = window.until_ms if window.until_ms is not None else (max(created) if created else None)
    return (None if since is None else since - margin_ms, None if until is None else until + margin_ms)


def _request_model_outputs(settings, topic: str) -> str | None:
    """The results topic that holds the answers to the requests of `topic`: a model's request
    topic (<requests_topic or high_priority_topic>.<model>) -> results_topic.<model>; a shared
    request topic -> the shared results_topic; None for a topic that is neither (a --topic
    of another name)."""
    bases = (settings.high_priority_topic, settings.requests_topic)
    if topic in bases:
        return settings.results_topic
    for b in bases:
        seg = topic[len(b) + 1:]
        if topic.startswith(b + ".") and seg and "." not in seg:
            return f"{settings.results_topic}.{seg}"
    return None


def results_topics(settings, window: Window) -> list[str]:
    """The existing results topics that hold the originals of `window`: the results topic of
    each model whose request topics it covers (the replayed model's: --source-model's, or the
    one replayed with), and the shared results_topic when it exists (results written before
    each model had its own); every results topic when the window covers a topic that is no
    request topic. Results are matched by source position afterwards, so a topic too many
    costs reading only. WindowError when none exists."""
    mapped = [_request_model_outputs(settings, t) for t in window.topics]
    if None in mapped:
        found = output_topics(settings, "results")
    else:
        names = list(dict.fromkeys([*mapped, settings.results_topic]))
        have = partition_counts(settings, names)
        found = [t for t in names if t in have]
    if not found:
        want = ", ".join(dict.fromkeys(t for t in mapped if t)) or f"{settings.results_topic}.<model>"
        raise WindowError(f"no results topic of the window of {', '.join(window.topics)} on "
                          f"{settings.bootstrap_servers} ({want}): no original results to compare with")
    return found


def originals(settings, window: Window, replayed: list[dict], margin_ms: int = 15 * 60_000) -> list[dict]:
    since, until = time_span(window, replayed, margin_ms)
    if until is not None and until > _now():
        until = None  # up to the end snapshot
    return [r for r in read_results(settings, results_topics(settings, window), since_ms=since, until_ms=until)
            if r["replay_run_id"] is None and _in_window(window, r["source"])]


def _now() -> int:

    return now_ms()


def original_models(settings, window: Window, sample: int = 200) -> Counter:
    """Model names of up to `sample` live results for this window (the warning check)."""

    names: Counter = Counter()
    try:
        w = resolve_window(settings, results_topics(settings, window), since=window.since_ms)
    except Exception:  # no results topic: nothing to warn about
        return names
    codec = Codec.from_settings(settings)
    reader = WindowReader(settings, w)
    try:
        seen = 0
        while not reader.done() and seen < sample * 5 and sum(names.values()) < sample:
            msgs = reader.poll(0.5)
            if not msgs:
                break
            for m in msgs:
                seen += 1
                name, rec = codec.decode_named(m.value())
                if name == RESULT and rec["replay_run_id"] is None and _in_window(window, rec["source"]):
                    names[rec["model"]["name"]] += 1
    finally:
        reader.close()
    return names


# -- comparing -----------------------------------------------------------------------------------
# What sets a differing request apart (its `outcome`). The first three are structural: the
# outputs are not compared value by value, and no cosine is made up for them.
STATUS, COUNT, DIMS = "status_mismatch", "output_count_mismatch", "dimension_mismatch"
ZERO, VALUES = "zero_vector", "differs"  # a zero vector on one side (cosine undefined); values apart


def _cosine(a: list[float], b: list[float]) -> float | None:
    """Cosine similarity, clamped to [-1, 1]; None where it is undefined (a zero vector, or
    vectors of different dimensions)."""
    if len(a) != len(b):
        return None
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        return None
    return max(-1.0, min(1.0, sum(x * y for x, y in zip(a, b)) / (na * nb)))


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    i = q * (len(s) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


@dataclass
class _Diff:
    divergence: float  # 0 = identical; higher = further apart
    detail: str
    exact: bool
    differs: bool = True  # apart beyond the tolerances (CLOSE, ONE): listed among the most divergent
    outcome: str | None = None  # STATUS, COUNT, DIMS, ZERO or VALUES when it differs
    cosine: float | None = None  # None: not comparable by cosine (or no inputs)
    max_abs: float | None = None
    labels: tuple[int, int] | None = None  # (agreeing, compared) inputs
    texts: tuple[int, int] | None = None
    dims: tuple[int, int] | None = None  # (original, replay) vector dimensions when they differ
    zero_vector: bool = False  # an input's vector is all zeros on either side: no cosine


def _at(i: int, n: int) -> str:
    return f" (input {i})" if n > 1 else ""


def _diff_embed(oa: list[dict], ob: list[dict], exact: bool) -> _Diff:
    n = len(oa)
    if not n:
        return _Diff(0.0, "no outputs", exact, differs=False)
    pairs = [(x["vector"], y["vector"]) for x, y in zip(oa, ob)]
    for i, (x, y) in enumerate(pairs):
        if len(x) != len(y):  # another model: there is no cosine between the two
            return _Diff(1.0, f"dimension mismatch {len(x)} vs {len(y)}{_at(i, n)}", exact, outcome=DIMS,
                         dims=(len(x), len(y)))

    def side(bad) -> tuple[int, str] | None:  # the first input where `bad` holds for a vector, and on which side
        for i, (x, y) in enumerate(pairs):
            if bad(x) or bad(y):
                return i, "both" if bad(x) and bad(y) else "original" if bad(x) else "replay"
        return None

    nonfinite = side(lambda v: not all(map(math.isfinite, v)))
    if nonfinite:
        i, where = nonfinite
        return _Diff(1.0, f"non-finite value in {where}{_at(i, n)}: cosine undefined", exact, differs=not exact,
                     outcome=None if exact else VALUES)
    mad = max(abs(p - q) for x, y in pairs for p, q in zip(x, y))
    low = min((c for c in (_cosine(x, y) for x, y in pairs) if c is not None), default=1.0)
    zero = side(lambda v: not any(v))
    if zero:  # cosine undefined: the request is left out of the cosine figures
        sided = [(i, "replay" if any(x) else "original") for i, (x, y) in enumerate(pairs) if any(x) != any(y)]
        one_sided = bool(sided)
        i, where = sided[0] if sided else zero  # a zero on one side first: that is the one that differs
        differs = not exact and (one_sided or mad > CLOSE or low < 1 - ONE)
        return _Diff(1.0 if one_sided else 1.0 - low,
                     f"zero vector in {where}{_at(i, n)}: cosine undefined, max |diff| {mad:.2e}", exact,
                     differs=differs, outcome=(ZERO if one_sided else VALUES) if differs else None, max_abs=mad,
                     zero_vector=True)
    differs = not exact and (low < 1 - ONE or mad > CLOSE)
    return _Diff(1.0 - low, f"cosine {low:.6f}, max |diff| {mad:.2e}", exact, differs=differs,
                 outcome=VALUES if differs else None, cosine=low, max_abs=mad)


def diff(task: str, a: dict, b: dict) -> _Diff:
    """One original (a) against its replay (b)."""
    oa, ob = a["outputs"], b["outputs"]
    exact = a["status"] == b["status"] and oa == ob
    if a["status"] != b["status"]:
        return _Diff(1.0, f"status {a['status']} -> {b['status']}, {len(oa)} -> {len(ob)} outputs", exact,
                     outcome=STATUS)
    if len(oa) != len(ob):
        return _Diff(1.0, f"{len(oa)} -> {len(ob)} outputs", exact, outcome=COUNT)
    n = len(oa)
    if task == "EMBED":
        return _diff_embed(oa, ob, exact)
    if task == "CLASSIFY":
        agree = sum(x["label"] == y["label"] for x, y in zip(oa, ob))
        dscore = max((abs(x["score"] - y["score"]) for x, y in zip(oa, ob)), default=0.0)
        dmap = max((abs(x["scores"][k] - y["scores"][k]) for x, y in zip(oa, ob)
                    for k in x.get("scores", {}).keys() & y.get("scores", {}).keys()), default=0.0)
        keys = any(x.get("scores", {}).keys() != y.get("scores", {}).keys() for x, y in zip(oa, ob))
        labels = ", ".join(f"{x['label']}->{y['label']}" for x, y in zip(oa, ob) if x["label"] != y["label"])
        differs = not exact and (agree < n or max(dscore, dmap) > CLOSE or keys)
        return _Diff((n - agree) / max(1, n) + dscore / 10, labels or f"score diff {max(dscore, dmap):.4f}"
                     + (", other labels scored" if keys else ""), exact, differs=differs,
                     outcome=VALUES if differs else None, labels=(agree, n))
    same = sum(x["text"] == y["text"] for x, y in zip(oa, ob))
    ratio = min((difflib.SequenceMatcher(None, x["text"], y["text"]).ratio() for x, y in zip(oa, ob)), default=1.0)
    first = next(((x["text"], y["text"]) for x, y in zip(oa, ob) if x["text"] != y["text"]), None)
    if first:
        detail = f"{first[0][:40]!r} -> {first[1][:40]!r}"
    else:  # same text; tokens or finish_reason may still differ
        other = next(((f, x.get(f), y.get(f)) for x, y in zip(oa, ob) for f in ("tokens", "finish_reason")
                      if x.get(f) != y.get(f)), None)
        detail = "same text" + (f", {other[0]} {other[1]} -> {other[2]}" if other else "")
    return _Diff(1.0 - ratio, detail, exact, differs=not exact, outcome=None if exact else VALUES,
                 texts=(same, n))


def compare(original: list[dict], replayed: list[dict], *, top: int = 10, replay_dead: list[dict] = ()) -> dict:
    """The drift report (plain JSON-able dict). Both sides are decoded results."""
    orig = {r["request_id"]: r for r in original}
    rep = {r["request_id"]: r for r in replayed}
    dead = {d["request_id"] for d in replay_dead if d.get("request_id")}
    tasks: dict[str, dict] = {}
    divergent = []
    for rid in sorted(orig.keys() | rep.keys()):
        a, b = orig.get(rid), rep.get(rid)
        task = (a or b)["task"]
        t = tasks.get(task)
        if t is None:
            t = tasks[task] = {"compared": 0, "missing_original": 0, "missing_replay": 0, "replay_dead_letters": 0,
                               "status_mismatch": 0, "output_count_mismatch": 0, "exact": 0, "differing": 0,
                               "_cos": [], "_mad": [], "_lab": [0, 0], "_txt": [0, 0]}
            if task == "EMBED":
                t.update(dimension_mismatch=0, mismatched_dims={}, zero_vector=0)
        if a is None:
            t["missing_original"] += 1
            continue
        if b is None:
            t["missing_replay"] += 1
            t["replay_dead_letters"] += rid in dead
            continue
        d = diff(task, a, b)
        t["compared"] += 1
        t["exact"] += d.exact
        if d.outcome in (STATUS, COUNT, DIMS):
            t[d.outcome] += 1
        if d.zero_vector:  # EMBED only
            t["zero_vector"] += 1
        if d.dims:
            k = f"{d.dims[0]} vs {d.dims[1]}"
            t["mismatched_dims"][k] = t["mismatched_dims"].get(k, 0) + 1
        if d.cosine is not None:
            t["_cos"].append(d.cosine)
        if d.max_abs is not None:
            t["_mad"].append(d.max_abs)
        for key, pair in (("_lab", d.labels), ("_txt", d.texts)):
            if pair:
                t[key][0] += pair[0]
                t[key][1] += pair[1]
        if d.differs:
            t["differing"] += 1
            src = a["source"]
            divergent.append({"request_id": rid, "task": task, "divergence": d.divergence, "detail": d.detail,
                              "outcome": d.outcome, "topic": src["topic"], "partition": src["partition"],
                              "offset": src["offset"]})
    for task, t in tasks.items():
        cos, mad, lab, txt = t.pop("_cos"), t.pop("_mad"), t.pop("_lab"), t.pop("_txt")
        if cos:
            t["cosine"] = {"min": min(cos), "p1": _quantile(cos, 0.01), "p5": _quantile(cos, 0.05),
                           "p50": _quantile(cos, 0.5), "mean": sum(cos) / len(cos),
                           "eq_1": sum(c >= 1 - ONE for c in cos), "lt_1": sum(c < 1 - ONE for c in cos)}
        if mad:
            t["close"] = sum(m <= CLOSE for m in mad)
            t["max_abs_diff"] = max(mad)
        if lab[1]:
            t["label_agreement"] = lab[0] / lab[1]
        if txt[1]:
            t["text_equal"] = txt[0] / txt[1]
    divergent.sort(key=lambda d: (-d["divergence"], d["request_id"]))
    return {"tasks": tasks, "original_models": dict(Counter(r["model"]["name"] for r in original)),
            "replay_models": dict(Counter(r["model"]["name"] for r in replayed)), "differing": len(divergent),
            "most_divergent": divergent[:top]}


def format_report(report: dict) -> str:
    """The report as a table for people."""
    lines = [f"originals by {_names(report['original_models'])}; replay by {_names(report['replay_models'])}", ""]
    head = ("task", "compared", "exact", "missing orig", "missing replay", "status diff")
    rows = [(task, t["compared"], t["exact"], t["missing_original"], t["missing_replay"], t["status_mismatch"])
            for task, t in sorted(report["tasks"].items())]
    lines += _table(head, rows)
    for task, t in sorted(report["tasks"].items()):
        if t.get("output_count_mismatch"):
            lines.append(f"{task} output count mismatch: {t['output_count_mismatch']} (not one output per input "
                         f"on both sides; not compared further)")
        if t.get("dimension_mismatch"):
            dims = t.get("mismatched_dims", {})
            what = next(iter(dims)) if len(dims) == 1 else ", ".join(f"{k}: {v}" for k, v in sorted(dims.items()))
            lines.append(f"{task} dimension mismatch: {t['dimension_mismatch']} ({what}, original vs replay; "
                         f"another model? not compared by cosine)")
        if t.get("zero_vector"):
            lines.append(f"{task} zero vector: {t['zero_vector']} (cosine undefined; left out of the cosine figures)")
        if "cosine" in t:
            c = t["cosine"]
            lines.append(f"{task} cosine  min {c['min']:.6f}  p1 {c['p1']:.6f}  p5 {c['p5']:.6f}  p50 {c['p50']:.6f}  "
                         f"mean {c['mean']:.6f}  (==1: {c['eq_1']}, <1: {c['lt_1']}; max |diff| "
                         f"{t['max_abs_diff']:.2e}, within {CLOSE:g}: {t['close']})")
        elif "max_abs_diff" in t:
            lines.append(f"{task} max |diff| {t['max_abs_diff']:.2e}, within {CLOSE:g}: {t['close']}")
        if "label_agreement" in t:
            lines.append(f"{task} label agreement {t['label_agreement']:.2%}")
        if "text_equal" in t:
            lines.append(f"{task} text equal {t['text_equal']:.2%}")
    shown = report["most_divergent"]
    differing = report.get("differing", len(shown))
    compared = sum(t["compared"] for t in report["tasks"].values())
    exact = sum(t["exact"] for t in report["tasks"].values())
    if shown:
        shown_of = f"{len(shown)} shown; " if differing > len(shown) else ""
        lines += ["", f"most divergent ({shown_of}{differing} of {compared} compared differ):"]
        # a position needs its topic: the window may cover both tiers
        lines += _table(("request_id", "task", "source", "divergence", "detail"),
                        [(d["request_id"], d["task"], f"{d['topic']} {d['partition']}@{d['offset']}",
                          f"{d['divergence']:.6f}", d["detail"]) for d in shown])
    elif compared and not differing:
        how = "exact" if exact == compared else f"within tolerance, {exact} exact"
        lines += ["", f"most divergent: none (all {compared} compared {how})"]
    elif differing:  # --top 0
        lines += ["", f"most divergent: {differing} of {compared} compared differ (none listed)"]
    return "\n".join(lines)


def _names(c: dict) -> str:
    return ", ".join(f"{k} ({v})" for k, v in c.items()) or "nobody"


def _table(head, rows) -> list[str]:
    cells = [tuple(map(str, head))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 or i == len(r) - 1 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(cells[0]), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in cells[1:]]


# -- a run against its originals -----------------------------------------------------------------
def replayed(settings, ck) -> tuple[list[dict], list[dict]]:
    """(results, dead letters) a replay run wrote, from its file (or its committed parts) or topic."""
    from pathlib import Path


    o = ck.output
    if o["kind"] == "file":
        done = ck.data["status"] == "done"
        paths = [Path(o["path"])] if done else [ck.dir / "parts" / n for n in ck.data["parts"]]
        rows = [r for p in paths for r in read_rows(p)]
        dead = [{"request_id": r["request_id"], "reason": r["reason"]} for r in rows if r["kind"] == "deadletter"]
        return [row_result(r) for r in rows if r["kind"] == "result"], dead
    for topic in (o["topic"], o["deadletter_topic"]):
        settle(settings, topic)
    res = [r for r in read_results(settings, o["topic"]) if r["replay_run_id"] == ck.run_id]
    dead = [d for d in read_dead_letters(settings, o["deadletter_topic"]) if d["replay_run_id"] == ck.run_id]
    return res, dead


def compare_run(settings, ck, *, top: int = 10, margin_ms: int = 15 * 60_000) -> dict:
    """The drift report of a replay run: its results against the live ones of its window."""
    s = settings.with_overrides(**ck.data["settings"])  # the results topic the run was started with
    rep, dead = replayed(s, ck)
    orig = originals(s, ck.window, rep, margin_ms)
    report = compare(orig, rep, top=top, replay_dead=dead)
    report["run_id"] = ck.run_id
    report["window"] = ck.data["window"]
    return report

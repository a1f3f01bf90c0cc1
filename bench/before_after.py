"""One benchmark at an earlier commit and at the work tree, alternately, in one run: what a
change did to a figure, on the same machine within minutes.

    .venv/bin/python bench/before_after.py --base 99c3676 [--pairs 2] -- overhead_bench.py --count 20000 --rounds 2
    .venv/bin/python bench/before_after.py --base 99c3676 -- latency_curve.py --only "inferlog adaptive" \\
        --loads 0.3,0.6,0.9 --schedules poisson --duration 15

The base commit (and --after, when given, else the work tree as it is) is checked out once
into a git worktree (under /tmp) and its packages are imported from there, with this venv's dependencies; the benchmark runs there and here in turn
(before, after, before, after...), each run saving into a folder of its own. It prints, per
contender, each run's figure and the ratio of the medians, and saves
bench/results/before_after_<benchmark>.json. It knows the figures of overhead_bench.py
(records/s, CPU µs per record) and latency_curve.py (p50/p99 per load, drain rate).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# where pyproject.toml maps each package (setuptools package-dir)
PACKAGES = {"inferlog": "inferlog", "inferlog.consumer": "consumer", "inferlog.producer": "producer",
            "inferlog.replay": "replay", "inferlog.schemas": "schemas"}

# Run a bench script with the inferlog packages of another tree: a meta-path finder put first
# answers for the packages, their submodules follow the package's own __path__.
LAUNCH = r"""
import importlib.util, runpy, sys
from importlib.abc import MetaPathFinder
tree, script, packages = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3].split(","))
class Tree(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in packages:
            d = f"{tree}/{packages[name]}"
            return importlib.util.spec_from_file_location(name, f"{d}/__init__.py", submodule_search_locations=[d])
        return None
sys.meta_path.insert(0, Tree())
sys.path.insert(0, f"{tree}/bench")
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""


def worktree(base: str) -> Path:
    rev = subprocess.run(["git", "rev-parse", "--short", base], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"inferlog-at-{rev}"
    if not (path / ".git").exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(path), rev], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def run(tree: Path, bench: list[str], results: Path) -> dict:
    """One run of the benchmark with `tree`'s packages; its saved JSON."""
    results.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, BENCH_RESULTS=str(results))
    script = str(tree / "bench" / bench[0])
    if tree == ROOT:
        cmd = [sys.executable, script, *bench[1:]]
    else:
        packages = ",".join(f"{k}={v}" for k, v in PACKAGES.items())
        cmd = [sys.executable, "-c", LAUNCH, str(tree), script, packages, *bench[1:]]
    print(f"$ ({tree.name}) {' '.join(bench)}", flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=True)
    saved = sorted(results.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not saved:
        raise SystemExit(f"{bench[0]} saved no JSON in {results}")
    return json.loads(saved[-1].read_text())


def figures(report: dict) -> dict[str, float]:
    """The comparable figures of one run: {name: value}."""
    out: dict[str, float] = {}
    # the machine's own pace, with no inferlog code in it: how far apart the runs' machines were
    for key in ("model_alone", "model_alone_worker_threads"):
        if isinstance(report.get(key), dict) and report[key].get("alone_per_s"):
            out[f"control: the model alone, {report[key]['threads']} thread(s), req/s"] = report[key]["alone_per_s"]
    for name, c in report.get("contenders", {}).items():
        if "per_s" in c:  # overhead_bench (its raw loop is the control: no inferlog code)
            out[f"{name}: records/s"] = c["per_s"]
            out[f"{name}: CPU µs/record"] = c["cpu_ms_per_request"] * 1000
        for p in c.get("points", []):  # latency_curve
            for q in ("p50_ms", "p99_ms"):
                if p.get(q) is not None:
                    out[f"{name}: {p['schedule']} {p['share']:g} {q}"] = p[q]
        if c.get("drain_per_s"):
            out[f"{name}: drain/s"] = c["drain_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit before the change")
    ap.add_argument("--after", help="the commit after the change (default: the work tree as it is)")
    ap.add_argument("--pairs", type=int, default=1, help="before/after pairs, alternating")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]: a script of bench/ and its arguments")
    args = ap.parse_args()
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    if not bench:
        ap.error("name the benchmark after --")
    before_tree = worktree(args.base)
    after_tree = worktree(args.after) if args.after else ROOT
    scratch = Path(tempfile.mkdtemp(prefix="before-after-"))
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(args.pairs):
        for side, tree in (("before", before_tree), ("after", after_tree)):
            runs[side].append(figures(run(tree, bench, scratch / f"{side}{i}")))
    names = [n for n in runs["after"][0] if all(n in r for rs in runs.values() for r in rs)]
    rows = []
    print(f"\n{' '.join(bench)}: before = {args.base}, after = {args.after or 'the work tree'}; {args.pairs} pair(s), "
          "alternating")
    for n in names:
        b = [r[n] for r in runs["before"]]
        a = [r[n] for r in runs["after"]]
        ratio = statistics.median(a) / statistics.median(b) if statistics.median(b) else float("nan")
        rows.append({"figure": n, "before": b, "after": a, "after_over_before": ratio})
        print(f"  {n:<60} before {' / '.join(f'{x:,.1f}' for x in b):>22}   after "
              f"{' / '.join(f'{x:,.1f}' for x in a):>22}   x{ratio:.2f}")
    out = ROOT / "bench" / "results" / f"before_after_{Path(bench[0]).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "base": args.base, "after": args.after or git.stdout.strip(),
                               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg": os.getloadavg(),
                               "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()

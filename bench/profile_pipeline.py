"""Where the pipeline's time goes: py-spy over pipeline_bench.py, summarised per thread.

    .venv/bin/python bench/profile_pipeline.py [--count 1500] [--rate 100] [pipeline_bench.py flags]
    .venv/bin/python bench/profile_pipeline.py --summarise RAW_FILE

Records `py-spy record --threads --format raw` of pipeline_bench.py (default settings, no naive
consumer) and prints, per thread, its samples and the innermost frames of inferlog, torch's
Linear, fastavro, tokenizers or confluent-kafka it spent them in. Threads named bench-model are
the offline contender, the rest (bench-worker = the loop, inferlog-device, inferlog-cpu) the
pipeline. Saves bench/results/profile.txt.
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile

from harness import RESULTS, ROOT

INTERESTING = ("consumer/", "inferlog/", "codec", "fastavro", "tokenizers", "confluent", "linear.py", "harness",
               "pipeline_bench", "threading.py")


def summarise(raw: str, top: int = 8) -> str:
    threads: collections.Counter = collections.Counter()
    frames: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in open(raw):
        stack, _, n = line.rstrip().rpartition(" ")
        parts = stack.split(";")
        thread = re.sub(r"\s*\(\d+\)|0x[0-9a-f]+", "", parts[1] if len(parts) > 1 else "?")
        threads[thread] += int(n)
        # the innermost frame we can act on, not libc or torch internals
        leaf = next((f for f in reversed(parts) if any(k in f for k in INTERESTING)), parts[-1])
        frames[thread][re.sub(r" \(.*?\)", "", leaf)] += int(n)
    out = []
    for thread, n in threads.most_common():
        out.append(f"{n:6d} samples  {thread}")
        out += [f"        {k:6d}  {f[:120]}" for f, k in frames[thread].most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--summarise", help="only summarise this py-spy raw file")
    ap.add_argument("--rate", default="100", help="py-spy samples per second")
    args, rest = ap.parse_known_args()
    raw = args.summarise
    if raw is None:
        raw = tempfile.mktemp(suffix=".txt", prefix="inferlog-pyspy-")
        rest = rest or ["--count", "1500"]
        subprocess.check_call([str(ROOT / ".venv" / "bin" / "py-spy"), "record", "-r", args.rate, "--threads",
                               "--format", "raw", "-o", raw, "--", sys.executable, str(ROOT / "bench" / "pipeline_bench.py"),
                               "--no-naive", "--out", "profile_run.json", *rest], cwd=ROOT)
    text = summarise(raw)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The model pipeline against the offline limit on a GPU: pipeline_bench.py with device=cuda, fp16.

    .venv/bin/python bench/gpu_bench.py [--count 20000] [--rounds 2] [any pipeline_bench.py flag]

Same contenders and figures as pipeline_bench.py (offline in arrival order and length-sorted,
the inferlog pipeline at the sweep's batch/wait settings); the naive consumer is left out
(one request per kernel launch says nothing new on a GPU). More requests than on CPU: the
device is ~50x faster, so short runs would only time start-up. Saves bench/results/gpu.json
and gpu.png. Refuses to run without CUDA instead of quietly timing the CPU.
"""
from __future__ import annotations

import sys

import pipeline_bench


def main(argv: list[str] | None = None) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; nothing measured", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"--count": "20000", "--rounds": "2"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    return pipeline_bench.main(["--device", "cuda", "--dtype", "float16", "--sweep", "--no-naive", "--out", "gpu.json", *argv])


if __name__ == "__main__":
    sys.exit(main())

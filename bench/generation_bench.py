"""Generation through the worker: static batching against continuous batching, same model, same run.

    .venv/bin/python bench/generation_bench.py [--requests 96] [--rate 1.4] [--seconds 45]

The model is GPT-2-shaped and built here (no downloads): --layers 6, --width 384 (11M
parameters), 512 positions, a 4,096-token BPE vocabulary trained on the bench's texts, random
weights and no end-of-sequence token, so every request generates exactly the tokens it asks
for. The workload mixes lengths as LLM traffic does: max_new_tokens drawn log-uniformly from
8 to 256, prompts of 8 to 128 tokens. Each mode (`generation = "static"`: a batch runs until
its longest row ends; `"continuous"`: rows join and leave the running batch every step) runs
a Worker on fresh topics of one broker, on the same requests, and is measured twice:

- drain: --requests published first, then the worker starts; tokens/s = generated tokens over
  the span from the first consume to the last completion (results' own timings);
- open loop: Poisson arrivals at --rate requests/s for --seconds (the default, ~70% of what
  static drains here, so neither mode falls behind for good); each request's latency is its result's completed_at
  minus created_at, reported for the short (<= 32 new tokens) and long (>= 128) ones apart.

Both modes are greedy: their texts must agree (checked; the run fails otherwise).
Saves bench/results/generation.json and generation.png.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from harness import (RESULTS, _epoch_ms, broker, fresh_settings, machine_facts, percentile, read_results, save,
                     serving)
from report import generation_table

from inferlog.codec import Codec
from inferlog.consumer.demo import sample_texts
from inferlog.producer.sync import Producer

SHORT, LONG = 32, 128


def build_model(directory: Path, layers: int, width: int, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample_texts(3000), trainers.BpeTrainer(
        vocab_size=4096, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)  # no eos: every request runs its whole length
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=512, n_embd=width, n_layer=layers, n_head=max(1, width // 64),
                     bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def workload(n: int, seed: int, words: list[str]) -> list[tuple[str, int]]:
    """(prompt, max_new_tokens): lengths log-uniform in 8..256, prompts of ~8..128 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        new = int(round(math.exp(rng.uniform(math.log(8), math.log(256)))))
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(6, 90)))
        out.append((prompt, new))
    return out


def worker(s, model_dir: str):
    from inferlog.consumer.runners import load_runner

    return serving(s, load_runner(model_dir, device="cpu"), timeout=90)  # run() warms the model up


def wait_results(s, n: int, timeout: float) -> list[dict]:
    codec, deadline = Codec.from_settings(s), time.monotonic() + timeout
    while True:
        got = read_results(s, codec, timeout=60)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(1.0)


def measure(base, mode: str, model_dir: str, reqs: list[tuple[str, int]], stream: list[tuple[float, str, int]],
            args) -> dict:
    s = fresh_settings(base, f"gen-{mode}", generation=mode, max_batch_size=args.batch,
                       max_batch_tokens=args.kv_tokens, max_in_flight=512, max_wait_ms=20,
                       max_new_tokens_limit=256, max_input_tokens=512,
                       torch_threads=1)  # the worker's own setting on 2 cores, pinned for other machines
    # drain: the backlog first, then the worker
    with Producer(s) as p:
        drain_ids = {p.submit("generate", t, parameters={"max_new_tokens": n}): n for t, n in reqs}
    print(f"[{mode}] draining {len(reqs)} requests ...", flush=True)
    with worker(s, model_dir):
        wait_results(s, len(drain_ids), timeout=args.timeout)
        # open loop on the same worker: Poisson arrivals
        print(f"[{mode}] open loop at {args.rate:g} req/s for {args.seconds:g} s ...", flush=True)
        open_ids = {}
        with Producer(s) as p:
            t0 = time.monotonic()
            for at, text, n in stream:
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                open_ids[p.submit("generate", text, parameters={"max_new_tokens": n})] = n
        allres = wait_results(s, len(drain_ids) + len(open_ids), timeout=args.timeout)
    by_id = {r["request_id"]: r for r in allres}
    drain = [by_id[i] for i in drain_ids if i in by_id]
    tokens = sum(r["outputs"][0]["tokens"] for r in drain)
    start = min(_epoch_ms(r["timings"]["consumed_at"]) for r in drain)
    end = max(_epoch_ms(r["timings"]["completed_at"]) for r in drain)
    lat = {"short": [], "mid": [], "long": []}
    for rid, n in open_ids.items():
        if rid in by_id:
            r = by_id[rid]
            ms = _epoch_ms(r["timings"]["completed_at"]) - _epoch_ms(r["timings"]["created_at"])
            lat["short" if n <= SHORT else "long" if n >= LONG else "mid"].append(ms)
    texts = {rid: by_id[rid]["outputs"][0]["text"] for rid in drain_ids if rid in by_id}
    order = list(drain_ids)  # same order in both modes: the texts compare by position
    return {"mode": mode, "drain": {"requests": len(drain), "answered_of": len(drain_ids), "tokens": tokens,
                                    "seconds": (end - start) / 1000, "tokens_per_s": tokens / ((end - start) / 1000),
                                    "requests_per_s": len(drain) / ((end - start) / 1000)},
            "open_loop": {"offered": len(open_ids), "answered": sum(len(v) for v in lat.values()),
                          **{k: {"n": len(v), "p50_ms": percentile(v, 50), "p90_ms": percentile(v, 90),
                                 "p99_ms": percentile(v, 99), "all_ms": sorted(v)} for k, v in lat.items()}},
            "texts": [texts.get(rid) for rid in order]}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    runs = report["runs"]
    bars = ax.bar([r["mode"] for r in runs], [r["drain"]["tokens_per_s"] for r in runs], color=["C0", "C1"])
    ax.bar_label(bars, labels=[f"{r['drain']['tokens_per_s']:,.0f}" for r in runs])
    ax.set_ylabel("generated tokens / s (drain of the backlog)")
    ax.set_title(f"{report['requests']} requests, 8-256 new tokens each")
    for i, r in enumerate(runs):
        for j, k in enumerate(("short", "mid", "long")):
            xs = r["open_loop"][k]["all_ms"]
            if xs:
                pos = j * 3 + i
                bx.boxplot([x / 1000 for x in xs], positions=[pos], widths=0.8, patch_artist=True,
                           boxprops={"facecolor": f"C{i}", "alpha": 0.6}, showfliers=False)
    bx.set_xticks([0.5, 3.5, 6.5], [f"short (<= {SHORT})", "mid", f"long (>= {LONG})"])
    bx.set_ylabel("latency s (created -> completed)")
    bx.set_title(f"open loop, Poisson {report['rate']:g} req/s: C0 static, C1 continuous")
    m = report["machine"]
    fig.text(0.01, 0.005, f"{m['date']}, {m['cpu_count']} CPUs shared with the broker, model {report['model']}",
             fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=96, help="the drained backlog")
    ap.add_argument("--rate", type=float, default=1.4, help="open loop: Poisson requests/s (~80%% of what static drains here)")
    ap.add_argument("--seconds", type=float, default=45.0, help="open loop: how long it offers")
    ap.add_argument("--batch", type=int, default=16, help="max_batch_size (static rows per batch; continuous rows running)")
    ap.add_argument("--kv-tokens", type=int, default=16384, help="max_batch_tokens (continuous: the KV cache)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="generation")
    ap.add_argument("--bootstrap-servers")
    args = ap.parse_args(argv)
    words = " ".join(sample_texts(500)).split()
    reqs = workload(args.requests, args.seed, words)
    rng = random.Random(args.seed + 1)
    stream, t = [], 0.0
    while True:
        t += rng.expovariate(args.rate)
        if t > args.seconds:
            break
        stream.append((t, *workload(1, rng.randrange(1 << 30), words)[0]))
    with tempfile.TemporaryDirectory(prefix="bench-gen-model-") as d, broker(args.bootstrap_servers) as base:
        model_dir = str(build_model(Path(d), args.layers, args.width))
        report = {"machine": machine_facts(sys.argv), "requests": args.requests, "rate": args.rate,
                  "seconds": args.seconds, "batch": args.batch, "kv_tokens": args.kv_tokens,
                  "model": f"GPT-2 shape, {args.layers} layers x {args.width}, 512 positions, vocab 4096",
                  "runs": [measure(base, mode, model_dir, reqs, stream, args) for mode in ("static", "continuous")]}
    static, cont = report["runs"]
    same = sum(a == b for a, b in zip(static.pop("texts"), cont.pop("texts")))
    report["same_texts"] = same
    save(report, f"{args.out}.json")
    plot(report, RESULTS / f"{args.out}.png")
    print("\n" + generation_table(report))
    print(f"\ngreedy texts equal in both modes: {same} of {args.requests}")
    return 0 if same == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())

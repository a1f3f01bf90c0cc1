"""Markdown tables of the benchmarks' JSON results. No inferlog or torch imports, so run_all.py
can render BENCHMARKS.md from saved results even while the package is being edited."""
from __future__ import annotations


def overhead_table(report: dict) -> str:
    raw = report["contenders"]["raw loop"]
    avro = report["contenders"].get("raw loop + Avro")  # absent from runs before it was added
    lines = ["| contender | records/s (from assignment) | / raw loop | / raw loop + Avro | steady records/s (after 1st commit) "
             "| / raw loop | CPU µs/record (bench process) | mean batch | load 1m | rounds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in report["contenders"].items():
        batch = f"{r['mean_batch_size']:.1f}" if "mean_batch_size" in r else "-"
        vs_avro = f"{r['per_s'] / avro['per_s']:.2f}" if avro else "-"
        lines.append(f"| {name} | {r['per_s']:.0f} | {r['per_s'] / raw['per_s']:.2f} | {vs_avro} | {r['steady_per_s']:.0f} | "
                     f"{r['steady_per_s'] / raw['steady_per_s']:.2f} | {r['cpu_ms_per_request'] * 1000:.0f} | {batch} | "
                     f"{r['loadavg_1m']:.1f} | {r['per_s_rounds']} |")
    return "\n".join(lines)


def engine_table(report: dict) -> str:
    codec = report["contenders"]["codec alone"]
    lines = ["| contender | records/s | CPU µs/record | / codec alone (throughput) | rounds |", "|---|---:|---:|---:|---|"]
    for name, r in report["contenders"].items():
        lines.append(f"| {name} | {r['per_s']:.0f} | {r['cpu_us_per_record']:.1f} | {r['per_s'] / codec['per_s']:.2f} | "
                     f"{r['per_s_rounds']} |")
    return "\n".join(lines)


def pipeline_table(report: dict) -> str:
    off = {(o["batch_size"], o["by_length"]): o["per_s"] for o in report["offline"]}
    naive = report["naive"]["per_s"] if report.get("naive") else float("nan")
    lines = ["| contender | batch / wait ms | requests/s | CPU ms/req | / offline | / offline sorted | / naive "
             "| mean batch | padded tokens | model busy | load 1m |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name, setting, r, bs, mean_batch, busy):
        padded = f"{r['padded_tokens']:,}" if "padded_tokens" in r else "-"  # absent before it was recorded
        lines.append(f"| {name} | {setting} | {r['per_s']:.1f} | {r['cpu_ms_per_request']:.1f} | "
                     f"{r['per_s'] / off[bs, False]:.2f} | {r['per_s'] / off[bs, True]:.2f} | {r['per_s'] / naive:.1f} | "
                     f"{mean_batch} | {padded} | {busy} | {r['loadavg_1m']:.1f} |")

    for o in report["offline"]:
        row("offline, " + ("length-sorted" if o["by_length"] else "arrival order"), f"{o['batch_size']} / -", o,
            o["batch_size"], o["batch_size"], f"{o['model_seconds'] / o['seconds']:.0%}")
    for p in report["pipeline"]:
        row("inferlog pipeline", f"{p['max_batch_size']} / {p['max_wait_ms']:g}", p, p["max_batch_size"],
            f"{p['mean_batch_size']:.1f}", f"{p['device_busy']:.0%}")
    for r in report.get("replay", []):  # pipeline_bench.py --replay
        row(f"replay to a {r['output']}", f"{r['max_batch_size']} / {r['max_wait_ms']:g}", r, r["max_batch_size"], "-", "-")
    if report.get("naive"):
        row("naive, 1 at a time", "1 / -", report["naive"], min(b for b, _ in off), 1, "-")
    return "\n".join(lines)


def peer_table(report: dict) -> str:
    ref = report["contenders"]["inferlog"]["saturation_per_s"]
    lines = ["| contender | drain req/s | inferlog / it | offered req/s (share of own saturation) | p50 ms | p95 ms | p99 ms | load 1m |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, c in report["contenders"].items():
        sat = c["saturation_per_s"]
        for i, p in enumerate(c["latency"]):
            head = f"| {name} | {sat:.1f} | {ref / sat:.1f} |" if i == 0 else "| | | |"
            lines.append(f"{head} {p['offered_per_s']:.0f} ({p['offered_per_s'] / sat:.0%}){'' if p['complete'] else ' INCOMPLETE'} | "
                         f"{p['p50_ms']:.0f} | {p['p95_ms']:.0f} | {p['p99_ms']:.0f} | {p['loadavg_1m']:.1f} |")
    return "\n".join(lines)


def scaling_table(report: dict) -> str:
    """bench/scaling_bench.py: one row per step of each scenario (workers joining, then one leaving)."""
    lines = ["| runner | step | workers | results/s | / 1 worker | / ceiling | per worker id (results/s) "
             "| high / normal /s | mean batch | device busy (ms per batch) | cores: workers / broker / machine "
             "| balanced after s | partitions moved (between stayers) | load 1m |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---:|---|---:|---|---:|"]
    for sc in report["scenarios"]:
        for i, st in enumerate(sc["steps"]):
            per = ", ".join(f"{w} {v:.0f}" for w, v in st["per_worker"].items())
            tiers = f"{st['per_tier'].get('high', 0):.0f} / {st['per_tier'].get('normal', 0):.0f}"
            ceiling = f"{st['of_ceiling']:.0%}" if "of_ceiling" in st else "-"  # only the sleep runner has one
            broker = f"{st['broker_cores']:.2f}" if st.get("broker_cores") is not None else "-"  # remote: unseen
            drain = f" (drain {st['drain_s']:.0f})" if st.get("drain_s") is not None else ""
            lines.append(f"| {sc['name'] if i == 0 else ''} | {st['event']} | {st['workers']} | {st['per_s']:.0f} | "
                         f"{st['vs_one']:.2f} | {ceiling} | {per} | {tiers} | {st['mean_batch']:.1f} | "
                         f"{st['device_busy']:.0%} ({st['ms_per_batch']:.0f} ms) | "
                         f"{st['worker_cores']:.2f} / {broker} / {st['machine_cores']:.2f} | {st['rebalance_s']:.1f}{drain} | "
                         f"{st['moved']} ({st['moved_between_stayers']}) | {st['loadavg_1m']:.1f} |")
    return "\n".join(lines)


def replay_scaling_table(report: dict) -> str:
    """bench/replay_scaling_bench.py: one row per member count, each a shared run of its own."""
    lines = ["| members | window | results/s (span) | / 1 member | / ceiling | all serving: results/s | / 1 member "
             "| span s (all joined after / tail) | wall s | per member (results) | high / normal | duplicates | load 1m |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---:|---:|"]
    one, one_all = report["runs"][0]["per_s"], report["runs"][0]["together_per_s"]
    for r in report["runs"]:
        per = ", ".join(f"{m} {v}" for m, v in r["per_member"].items())
        tiers = f"{r['per_topic'].get(report['high_topic'], 0)} / {r['per_topic'].get(report['normal_topic'], 0)}"
        lines.append(f"| {r['members']} | {r['window']} | {r['per_s']:.0f} | {r['per_s'] / one:.2f} | "
                     f"{r['per_s'] / (r['members'] * report['ceiling']):.0%} | {r['together_per_s']:.0f} | "
                     f"{r['together_per_s'] / one_all:.2f} | {r['span_s']:.1f} ({r['joined_after_s']:.1f} / "
                     f"{r['tail_s']:.1f}) | {r['wall_s']:.1f} | {per} | {tiers} | {r['duplicates']} | "
                     f"{r['loadavg_1m']:.1f} |")
    return "\n".join(lines)


def generation_table(report: dict) -> str:
    """bench/generation_bench.py: static vs continuous batching, drain and open loop."""
    lines = ["| mode | drain: tokens/s (requests/s) | / static | open loop p50 / p90 ms: short (<= 32 tokens) "
             "| mid | long (>= 128) | answered |",
             "|---|---:|---:|---|---|---|---:|"]
    static = next(r for r in report["runs"] if r["mode"] == "static")["drain"]["tokens_per_s"]
    for r in report["runs"]:
        d, o = r["drain"], r["open_loop"]
        cell = lambda k: f"{o[k]['p50_ms']:,.0f} / {o[k]['p90_ms']:,.0f} (n {o[k]['n']})"  # noqa: E731
        lines.append(f"| {r['mode']} | {d['tokens_per_s']:,.0f} ({d['requests_per_s']:.2f}) | "
                     f"{d['tokens_per_s'] / static:.2f} | {cell('short')} | {cell('mid')} | {cell('long')} | "
                     f"{o['answered']} / {o['offered']} |")
    return "\n".join(lines)

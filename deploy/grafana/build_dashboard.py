"""Writes deploy/grafana/dashboards/inferlog.json, the worker dashboard Grafana provisions.

The JSON is generated so that every panel has the same shape and filters, and so that
tests/test_deploy.py can check each queried metric against the worker's metric names.
Run: python deploy/grafana/build_dashboard.py
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "inferlog.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"


def quantiles(metric: str, by: str = "", qs=(0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    """histogram_quantile over the buckets summed across workers (by `le` and `by`)."""
    keys = ", ".join(k for k in ("le", by) if k)
    lab = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({keys}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
             f"{lab}p{round(q * 100)}") for q in qs]


def mean(metric: str, by: str = "") -> tuple[str, str]:
    grp = f" by ({by})" if by else ""
    return (f"sum{grp} (rate({metric}_sum{{{SEL}}}[{RATE}])) / sum{grp} (rate({metric}_count{{{SEL}}}[{RATE}]))",
            f"{{{{{by}}}}} mean" if by else "mean")


# (title, unit, [(expr, legend)], width, kind, description)
ROWS = [
    ("Throughput", [
        ("Results by status", "reqps", [
            (f"sum by (status) (rate(inferlog_results_total{{{SEL}}}[{RATE}]))", "{{status}}"),
            (f"sum(rate(inferlog_records_consumed_total{{{SEL}}}[{RATE}]))", "consumed")], 8, "timeseries",
         "Records consumed and results written per second, by result status."),
        ("Dead letters by reason", "reqps", [
            (f"sum by (reason) (rate(inferlog_dead_letters_total{{{SEL}}}[{RATE}]))", "{{reason}}")], 8, "timeseries",
         "Requests that ended as dead letters, by reason code."),
        ("Tokens / s", "short", [
            (f"sum(rate(inferlog_tokens_total{{{SEL}}}[{RATE}]))", "tokens/s")], 4, "timeseries",
         "Input tokens processed per second (padding not counted)."),
        ("Ready workers", "short", [
            (f"sum(inferlog_ready{{{SEL}}})", "ready")], 4, "stat",
         "Workers with a warm model and assigned partitions."),
    ]),
    ("Latency", [
        ("End-to-end latency (created -> committed)", "s", quantiles("inferlog_end_to_end_seconds"), 12, "timeseries",
         "From the request's created_at to the commit of its result."),
        ("Stage time p95", "s", quantiles("inferlog_stage_seconds", "stage", (0.95,)), 6, "timeseries",
         "95th percentile time per batch in each stage."),
        ("Stage time mean", "s", [mean("inferlog_stage_seconds", "stage")], 6, "timeseries",
         "Mean time per batch in each stage."),
        ("Executor queue wait p95", "s", quantiles("inferlog_executor_queue_wait_seconds", "executor", (0.95,)), 12,
         "timeseries", "Time a task waits for a thread of the CPU pool or the device thread."),
        ("Commits by outcome", "ops", [
            (f"sum by (outcome) (rate(inferlog_commits_total{{{SEL}}}[{RATE}]))", "{{outcome}}")], 12, "timeseries",
         "Kafka transactions committed or aborted per second."),
    ]),
    ("Batching", [
        ("Batch size (requests)", "short", [*quantiles("inferlog_batch_size", qs=(0.5, 0.95)),
                                            mean("inferlog_batch_size")], 12, "timeseries",
         "Requests per batch."),
        ("Batch tokens (padded)", "short", [*quantiles("inferlog_batch_tokens", qs=(0.5, 0.95)),
                                            mean("inferlog_batch_tokens")], 12, "timeseries",
         "Padded tokens per batch; bounded by max_batch_tokens."),
    ]),
    ("Kafka and back-pressure", [
        # max by (topic, partition) first: during a rebalance two workers may both report a partition
        ("Consumer lag by tier", "short", [
            (f"sum by (topic) (max by (topic, partition) (inferlog_consumer_lag{{{SEL}}}))", "{{topic}}")], 6,
         "timeseries", "Records the group has not committed yet (log end minus committed offset), summed over "
         "each request topic's partitions: a tier is its topic."),
        ("Consumer lag by partition", "short", [
            (f"max by (topic, partition) (inferlog_consumer_lag{{{SEL}}})", "{{topic}}[{{partition}}]")], 6,
         "timeseries", "Log end minus the group's committed offset, per assigned partition of both request "
         "topics (max over workers during a rebalance)."),
        ("In-flight records", "short", [
            (f"sum by (instance) (inferlog_in_flight_records{{{SEL}}})", "{{instance}}")], 6, "timeseries",
         "Records between fetch and commit, at most max_in_flight per tier."),
        ("Held and paused", "short", [
            (f"sum by (tier) (inferlog_held_records{{{SEL}}})", "held {{tier}}"),
            (f"sum by (tier) (inferlog_paused_partitions{{{SEL}}})", "paused partitions {{tier}}")], 6, "timeseries",
         "Records fetched past max_in_flight, waiting for room; a tier's partitions pause once it holds "
         "max_in_flight more."),
    ]),
    ("Device", [
        ("GPU memory", "bytes", [
            (f"inferlog_device_memory_bytes{{{SEL}}}", "{{instance}}")], 12, "timeseries",
         "Device memory allocated by the worker (GPU workers only)."),
        ("GPU utilization", "percentunit", [
            (f"inferlog_device_utilization{{{SEL}}}", "{{instance}}")], 12, "timeseries",
         "Device utilization, 0..1 (GPU workers only)."),
    ]),
]


def panel(pid, title, unit, targets, w, kind, desc, x, y) -> dict:
    p = {"id": pid, "type": kind, "title": title, "description": desc, "datasource": DS,
         "gridPos": {"h": 8, "w": w, "x": x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": leg}
                     for i, (e, leg) in enumerate(targets)]}
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi"}}
    return p


def dashboard() -> dict:
    panels, y, pid = [], 0, 1
    for row, items in ROWS:
        panels.append({"id": pid, "type": "row", "title": row, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for title, unit, targets, w, kind, desc in items:
            if x + w > 24:
                x, y = 0, y + 8
            panels.append(panel(pid, title, unit, targets, w, kind, desc, x, y))
            pid, x = pid + 1, x + w
        y += 8
    return {
        "uid": "inferlog-worker", "title": "inferlog workers", "tags": ["inferlog", "kafka"],
        "schemaVersion": 39, "version": 1, "editable": False, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"}, "timezone": "browser",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
             "current": {"text": "Prometheus", "value": "prometheus"}},
            {"name": "instance", "type": "query", "label": "Worker", "datasource": DS,
             "query": {"query": "label_values(inferlog_ready, instance)", "refId": "instance"},
             "definition": "label_values(inferlog_ready, instance)", "refresh": 2,
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")

"""Writes deploy/grafana/dashboards/inferlog.json, the worker dashboard Grafana provisions.

The JSON is generated so that every panel has the same shape and filters, and so that
tests/test_deploy.py can check each queried metric against the worker's metric names.
Every query filters on the `model` and `instance` variables (SEL) and every panel splits by
`model` (each worker exports its series labelled with its served name): no panel is global.
Run: python deploy/grafana/build_dashboard.py
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "inferlog.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model", instance=~"$instance"'
RATE = "$__rate_interval"


def quantiles(metric: str, by: str = "", qs=(0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    """histogram_quantile over the buckets summed across each model's workers (by `le`, `model`, `by`)."""
    keys = ", ".join(k for k in ("le", "model", by) if k)
    lab = f"{{{{model}}}} {{{{{by}}}}} " if by else "{{model}} "
    return [(f"histogram_quantile({q}, sum by ({keys}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
             f"{lab}p{round(q * 100)}") for q in qs]


def mean(metric: str, by: str = "") -> tuple[str, str]:
    grp = f" by (model, {by})" if by else " by (model)"
    return (f"sum{grp} (rate({metric}_sum{{{SEL}}}[{RATE}])) / sum{grp} (rate({metric}_count{{{SEL}}}[{RATE}]))",
            f"{{{{model}}}} {{{{{by}}}}} mean" if by else "{{model}} mean")


# (title, unit, [(expr, legend)], width, kind, description)
ROWS = [
    ("Throughput", [
        ("Results by status", "reqps", [
            (f"sum by (model, status) (rate(inferlog_results_total{{{SEL}}}[{RATE}]))", "{{model}} {{status}}"),
            (f"sum by (model) (rate(inferlog_records_consumed_total{{{SEL}}}[{RATE}]))", "{{model}} consumed")],
         8, "timeseries",
         "Records consumed and results written per second, by result status."),
        ("Dead letters by reason", "reqps", [
            (f"sum by (model, reason) (rate(inferlog_dead_letters_total{{{SEL}}}[{RATE}]))", "{{model}} {{reason}}")],
         8, "timeseries",
         "Requests that ended as dead letters, by reason code."),
        ("Tokens / s", "short", [
            (f"sum by (model) (rate(inferlog_tokens_total{{{SEL}}}[{RATE}]))", "{{model}}")], 4, "timeseries",
         "Input tokens processed per second (padding not counted)."),
        ("Ready workers", "short", [
            (f"sum by (model) (inferlog_ready{{{SEL}}})", "{{model}}")], 4, "stat",
         "Workers with a warm model and assigned partitions, per model."),
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
            (f"sum by (model, outcome) (rate(inferlog_commits_total{{{SEL}}}[{RATE}]))", "{{model}} {{outcome}}")],
         12, "timeseries",
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
        # max by (model, topic, partition) first: during a rebalance two workers may both report a
        # partition (each model's group reads its own topics; the shared layout's are read by one group)
        ("Consumer lag by tier", "short", [
            (f"sum by (model, topic) (max by (model, topic, partition) (inferlog_consumer_lag{{{SEL}}}))",
             "{{model}} {{topic}}")], 6,
         "timeseries", "Records each model's group has not committed yet (log end minus committed offset), summed "
         "over each request topic's partitions: a tier is its topic."),
        ("Consumer lag by partition", "short", [
            (f"max by (model, topic, partition) (inferlog_consumer_lag{{{SEL}}})",
             "{{model}} {{topic}}[{{partition}}]")], 6,
         "timeseries", "Log end minus the group's committed offset, per assigned partition of both request "
         "topics (max over workers during a rebalance)."),
        ("In-flight records", "short", [
            (f"sum by (model, instance) (inferlog_in_flight_records{{{SEL}}})", "{{model}} {{instance}}")],
         6, "timeseries",
         "Records between fetch and commit, at most max_in_flight per tier."),
        ("Held and paused", "short", [
            (f"sum by (model, tier) (inferlog_held_records{{{SEL}}})", "{{model}} held {{tier}}"),
            (f"sum by (model, tier) (inferlog_paused_partitions{{{SEL}}})", "{{model}} paused partitions {{tier}}")],
         6, "timeseries",
         "Records fetched past max_in_flight, waiting for room; a tier's partitions pause once it holds "
         "max_in_flight more."),
    ]),
    ("Device", [
        ("GPU memory", "bytes", [
            (f"sum by (model, instance) (inferlog_device_memory_bytes{{{SEL}}})", "{{model}} {{instance}}")],
         12, "timeseries",
         "Device memory allocated by the worker (GPU workers only)."),
        ("GPU utilization", "percentunit", [
            (f"max by (model, instance) (inferlog_device_utilization{{{SEL}}})", "{{model}} {{instance}}")],
         12, "timeseries",
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
            # every served model (each worker labels its series with its served name); All's
            # ".*" also matches a series without the label
            {"name": "model", "type": "query", "label": "Model", "datasource": DS,
             "query": {"query": "label_values(inferlog_ready, model)", "refId": "model"},
             "definition": "label_values(inferlog_ready, model)", "refresh": 2,
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}},
            {"name": "instance", "type": "query", "label": "Worker", "datasource": DS,
             "query": {"query": 'label_values(inferlog_ready{model=~"$model"}, instance)', "refId": "instance"},
             "definition": 'label_values(inferlog_ready{model=~"$model"}, instance)', "refresh": 2,
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")

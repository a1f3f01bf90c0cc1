"""`inferlog worker`: the long-running worker for real deployments."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import click

from inferlog.errors import ConfigError
from inferlog.settings import load_settings

log = logging.getLogger("inferlog.worker")


def worker_options(f):
    """Flags shared by `worker` and `demo`; each defaults to its INFERLOG_* variable."""
    opts = [
        click.option("--bootstrap-servers", help="Kafka bootstrap servers [INFERLOG_BOOTSTRAP_SERVERS, KAFKA_BOOTSTRAP_SERVERS]."),
        click.option("--requests-topic", help="Topic to consume requests from [INFERLOG_REQUESTS_TOPIC]."),
        click.option("--results-topic", help="Topic to write results to [INFERLOG_RESULTS_TOPIC]."),
        click.option("--deadletter-topic", help="Topic for dead letters [INFERLOG_DEADLETTER_TOPIC]."),
        click.option("--group-id", help="Consumer group [INFERLOG_GROUP_ID]."),
        click.option("--group-protocol", type=click.Choice(["consumer", "classic"]),
                     help="consumer (KIP-848, Kafka 4: each request topic balanced per member) or classic "
                          "(cooperative-sticky, older clusters) [INFERLOG_GROUP_PROTOCOL, default consumer]."),
        click.option("--worker-id", help="Stable id of this worker (default: host-pid) [INFERLOG_WORKER_ID]."),
        click.option("--model", help="Local model directory or hub id (default: the embedded all-MiniLM-L6-v2) [INFERLOG_MODEL]."),
        click.option("--model-name", help="Name results carry and requests may ask for [INFERLOG_MODEL_NAME]."),
        click.option("--task", type=click.Choice(["embed", "generate", "classify"]), help="Task (default: from the model's config) [INFERLOG_TASK]."),
        click.option("--device", help="auto, cpu, cuda or cuda:N [INFERLOG_DEVICE]."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), help="[INFERLOG_DTYPE]"),
        click.option("--max-batch-size", type=int, help="Rows per batch at most [INFERLOG_MAX_BATCH_SIZE]."),
        click.option("--max-batch-tokens", type=int, help="Padded tokens per batch at most [INFERLOG_MAX_BATCH_TOKENS]."),
        click.option("--max-wait-ms", type=float, help="Longest a request waits for batch-mates [INFERLOG_MAX_WAIT_MS]."),
        click.option("--batching", type=click.Choice(["adaptive", "fixed"]),
                     help="adaptive: cut a batch when the device can take it, sized to the arrival rate; fixed: "
                          "at --max-batch-size or after --max-wait-ms [INFERLOG_BATCHING, default adaptive]."),
        click.option("--latency-target-ms", type=float,
                     help="Adaptive batching holds a partial batch no longer than this leaves room for "
                          "[INFERLOG_LATENCY_TARGET_MS, default 300]."),
        click.option("--commit-interval-ms", type=float, help="Least time between two commits; 0: back to back [INFERLOG_COMMIT_INTERVAL_MS]."),
        click.option("--delivery", type=click.Choice(["exactly-once", "at-least-once"]), help="[INFERLOG_DELIVERY]"),
        click.option("--cpu-workers", type=int, help="Threads for decode/tokenize/postprocess [INFERLOG_CPU_WORKERS]."),
        click.option("--torch-threads", type=int,
                     help="torch's threads for a model on the CPU; 0: the cores less one [INFERLOG_TORCH_THREADS, default 0]."),
        click.option("--max-in-flight", type=int, help="Records of a tier between fetch and commit; as many more are held before partitions pause [INFERLOG_MAX_IN_FLIGHT]."),
        click.option("--metrics-port", type=int, help="Serve /metrics, /healthz, /readyz on this port; 0 = off [INFERLOG_METRICS_PORT]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def settings_from_flags(**flags):
    return load_settings(**{k: v for k, v in flags.items() if v is not None})


def build_runner(settings):
    from .runners import load_runner

    runner = load_runner(settings.model, task=settings.task, device=settings.device, dtype=settings.dtype,
                         name=settings.model_name)
    from .engine import share_cores

    share_cores(settings, runner)  # before the warm-up starts torch's thread pool
    from .faults import FaultyRunner, wants_faults

    if wants_faults(settings):
        log.warning("fault injection is ON (marker %r, rate %s, slow %s ms): for tests and chaos runs only",
                    settings.fault_marker, settings.fault_rate, settings.fault_slow_ms)
        runner = FaultyRunner.from_settings(runner, settings)
    return runner


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


@click.command("worker")
@worker_options
@click.option("--processes", default="auto", show_default=True,
              help="Worker processes: 'auto' = one per visible GPU (1 without GPUs), or a number.")
@click.option("--create-topics/--no-create-topics", default=True, show_default=True,
              help="Create the topics (idempotently) before joining the group.")
def worker(processes: str, create_topics: bool, **flags) -> None:
    """Consume requests, micro-batch them through the model, emit results exactly once.

    Stops cleanly on SIGTERM/SIGINT: stops fetching, finishes and commits what it holds,
    leaves the group and exits 0.
    """
    settings = settings_from_flags(**flags)
    n = _gpu_count() if processes == "auto" else int(processes)
    if n > 1 and settings.device in ("auto", "cuda"):
        sys.exit(_supervise(n, settings))
    # until the worker installs its own handlers it holds nothing: a stop just exits cleanly
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    if create_topics:
        from inferlog.topics import ensure_topics

        ensure_topics(settings)
    from .worker import Worker

    try:
        runner = build_runner(settings)
    except ConfigError as e:
        raise click.ClickException(str(e))
    from inferlog.telemetry import setup_tracing

    if setup_tracing(settings):
        log.info("exporting traces to %s", settings.otlp_endpoint)
    w = Worker(settings, runner)
    w.install_signal_handlers()
    sys.exit(w.run())


def _supervise(n: int, settings) -> int:
    """One child per GPU, each seeing only its own device; signals are passed on."""
    children = []
    for i in range(n):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i), INFERLOG_WORKER_ID=f"{settings.worker_id}-gpu{i}")
        if settings.metrics_port:  # one port per process: metrics_port, +1, +2, ...
            env["INFERLOG_METRICS_PORT"] = str(settings.metrics_port + i)
        children.append(subprocess.Popen([sys.argv[0], *sys.argv[1:], "--processes", "1"], env=env))
    log.info("started %d worker processes, one per GPU", n)

    def forward(sig, _):
        for c in children:
            c.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [c.wait() for c in children]
    return max(codes)

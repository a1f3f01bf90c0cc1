"""`inferlog worker`: the long-running worker for real deployments."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import click

from inferlog.errors import ConfigError, RestartRequired
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
        click.option("--generation", type=click.Choice(["continuous", "static"]),
                     help="generate: continuous batching (rows join and leave the running batch each step; the KV "
                          "cache holds --max-batch-tokens) or static (a batch runs until its longest row ends; "
                          "seeded sampling gives the same text in any batch) [INFERLOG_GENERATION, default continuous]."),
        click.option("--commit-interval-ms", type=float, help="Least time between two commits; 0: back to back [INFERLOG_COMMIT_INTERVAL_MS]."),
        click.option("--delivery", type=click.Choice(["exactly-once", "at-least-once"]), help="[INFERLOG_DELIVERY]"),
        click.option("--cpu-workers", type=int, help="Threads for decode/tokenize/postprocess [INFERLOG_CPU_WORKERS]."),
        click.option("--stages", type=click.Choice(["threads", "inline"]),
                     help="threads: CPU stages on the pool, the model on a device loop, overlapping; inline: every "
                          "stage on the loop thread, for models whose work is short and holds the GIL "
                          "[INFERLOG_STAGES, default threads]."),
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


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


@click.command("worker")
@worker_options
@click.option("--processes", envvar="INFERLOG_PROCESSES", default="auto", show_default=True,
              help="Worker processes in this pod or host, each a group member with its own GIL: 'auto' = "
                   "--processes-per-gpu per visible GPU (1 without GPUs), or a number (spread over the GPUs "
                   "round-robin) [INFERLOG_PROCESSES].")
@click.option("--processes-per-gpu", envvar="INFERLOG_PROCESSES_PER_GPU", type=click.IntRange(1), default=1,
              show_default=True,
              help="With --processes auto: processes sharing each GPU. One process's Python (decode, "
                   "batching, result encoding, under one GIL) feeds a GPU 10,000-14,000 small records/s at most here; "
                   "more processes feed it more, each with its own copy of the model [INFERLOG_PROCESSES_PER_GPU].")
@click.option("--create-topics/--no-create-topics", default=True, show_default=True,
              help="Create the topics (idempotently) before joining the group.")
def worker(processes: str, processes_per_gpu: int, create_topics: bool, **flags) -> None:
    """Consume requests, micro-batch them through the model, emit results exactly once.

    Stops cleanly on SIGTERM/SIGINT: stops fetching, finishes and commits what it holds,
    leaves the group and exits 0.
    """
    settings = settings_from_flags(**flags)
    gpus = _gpu_count() if settings.device in ("auto", "cuda") else 0
    n = process_count(processes, processes_per_gpu, gpus)
    if n > 1:
        if create_topics:  # once, before the members start
            from inferlog.topics import ensure_topics

            ensure_topics(settings)
        sys.exit(_supervise(n, gpus, settings))
    # until the worker installs its own handlers it holds nothing: a stop just exits cleanly
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    if create_topics:
        from inferlog.topics import ensure_topics

        ensure_topics(settings)
    from .runners import build_runner
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
    code = w.run()
    if code == RestartRequired.exit_code and not w.stopping.is_set():
        _restart(settings)
    if code != 0:
        # A worker that must stop (fenced, a broken device) has given up what it held, which the
        # next owner redoes: it leaves at once. Tearing the interpreter down after a fatal
        # producer error sometimes aborted instead (std::terminate, exit -6, in the fencing
        # chaos test), which an orchestrator reads as a crash, not as "fenced" (3).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _restart(settings) -> None:
    """Start this worker again in the same process slot (exec: same pid, so a supervisor, a pod
    or a test sees one worker that went on) under the same worker id, whose init_transactions
    aborts what the old producer left open. Nothing of the old process survives an exec:
    threads, librdkafka's sockets (close-on-exec) and any request a stuck client still held."""
    log.warning("restarting worker %s (same id, same process slot; restart %d)", settings.worker_id,
                settings.restarts + 1)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # a default worker id names the pid: keep it as it was
    env = dict(os.environ, INFERLOG_WORKER_ID=settings.worker_id, INFERLOG_RESTARTS=str(settings.restarts + 1))
    os.execve(sys.executable, [sys.executable, "-m", "inferlog.cli", *sys.argv[1:], "--no-create-topics"], env)


def process_count(processes: str, per_gpu: int, gpus: int) -> int:
    if processes == "auto":
        return max(1, gpus) * per_gpu if gpus else 1
    try:
        n = int(processes)
    except ValueError:
        raise click.BadParameter(f"{processes!r}: 'auto' or a number of processes", param_hint="--processes")
    if n < 1:
        raise click.BadParameter(f"{n}: at least 1", param_hint="--processes")
    return n


def child_env(i: int, n: int, gpus: int, settings) -> dict:
    """Process i of n: its own worker id (and so transactional id) and metrics port, and, with
    GPUs, only its own GPU (round-robin: with 2 GPUs and 4 processes, 0 1 0 1)."""
    env = dict(os.environ, INFERLOG_WORKER_ID=f"{settings.worker_id}-p{i}", INFERLOG_PROCESSES="1")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
    if settings.metrics_port:  # one port per process: metrics_port, +1, +2, ...
        env["INFERLOG_METRICS_PORT"] = str(settings.metrics_port + i)
    return env


def _supervise(n: int, gpus: int, settings) -> int:
    """n worker processes, each a member of the group with a GIL of its own; signals are passed
    on. One that fails (a broken device, a fenced producer) stops the others, and the pod with
    them, so that its orchestrator restarts the whole; one that stopped cleanly leaves the others
    serving."""
    # the same command line (the last of a repeated option wins), as one process each
    argv = [sys.executable, "-m", "inferlog.cli", *sys.argv[1:], "--processes", "1", "--no-create-topics"]
    children = [subprocess.Popen(argv, env=child_env(i, n, gpus, settings)) for i in range(n)]
    log.info("started %d worker processes (%s)", n,
             f"{gpus} GPU(s), {n / gpus:g} per GPU" if gpus else "no GPU")
    stopping = False

    def forward(sig, _):
        nonlocal stopping
        stopping = True
        for c in children:
            if c.poll() is None:
                c.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    running = list(children)
    while running:
        for c in list(running):
            code = c.poll()
            if code is None:
                continue
            running.remove(c)
            if code != 0:
                worst = worst or (code if code > 0 else 128 - code)  # killed by a signal: 128 + its number
                if not stopping:
                    log.error("worker process %d exited with %d: stopping the others", c.pid, code)
                    forward(signal.SIGTERM, None)
        time.sleep(0.2)
    return worst

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
from inferlog.options import settings_from, settings_options

log = logging.getLogger("inferlog.worker")


# the settings of a worker: everything but the gateway's, the producer's, replay's, the local
# broker's and the log settings, which `inferlog` itself takes (`inferlog --log-json worker`)
WORKER_SETTINGS = ("connection", "topics", "worker", "served model", "batching", "limits", "executors", "metrics_port",
                   "kafka_debug", "otlp_endpoint", "faults")
# vLLM's flag, which users know; --model-name stays as its alias
SERVED_NAME = {"model_name": ("--served-model-name", "--model-name")}
worker_options = settings_options(*WORKER_SETTINGS, exclude=("replays_topic", "processes", "processes_per_gpu"),
                                  flags=SERVED_NAME)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


@click.command("worker")
@settings_options(*WORKER_SETTINGS, exclude=("replays_topic",), flags=SERVED_NAME)
@click.option("--create-topics/--no-create-topics", default=True, show_default=True,
              help="Create the topics (idempotently) before joining the group.")
def worker(create_topics: bool, **flags) -> None:
    """Consume requests, micro-batch them through the model, emit results exactly once.

    Stops cleanly on SIGTERM/SIGINT: stops fetching, finishes and commits what it holds,
    leaves the group and exits 0.
    """
    settings = settings_from(flags)
    gpus = _gpu_count() if settings.device in ("auto", "cuda") else 0
    n = process_count(settings.processes, settings.processes_per_gpu, gpus)
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
        _flush()
        os._exit(code)
    sys.exit(code)


def _restart(settings) -> None:
    """Start this worker again in the same process slot (exec: same pid, so a supervisor, a pod
    or a test sees one worker that went on) under the same worker id, whose init_transactions
    aborts what the old producer left open. Nothing of the old process survives an exec:
    threads, librdkafka's sockets (close-on-exec) and any request a stuck client still held."""
    log.warning("restarting worker %s (same id, same process slot; restart %d)", settings.worker_id,
                settings.restarts + 1)
    _flush()
    # a default worker id names the pid: keep it as it was
    env = dict(os.environ, INFERLOG_WORKER_ID=settings.worker_id, INFERLOG_RESTARTS=str(settings.restarts + 1))
    os.execve(sys.executable, [sys.executable, "-m", "inferlog.cli", *sys.argv[1:], "--no-create-topics"], env)


def _flush() -> None:
    """Logs and output out before the process is left (os._exit) or replaced (exec)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


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

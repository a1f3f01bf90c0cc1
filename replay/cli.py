"""`inferlog replay` (run a window again, resume it, compare it) and `inferlog audit`."""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

import click

from inferlog.errors import ConfigError, InferlogError
from inferlog.options import settings_from, settings_options
from inferlog.timefmt import parse_duration

# the settings a replay takes: the model and the engine's, as a worker's; the live tiers' topics
# are read from the environment (a window names its own with --topic)
REPLAY_SETTINGS = ("connection", "results_topic", "replays_topic", "framing", "schema_registry_url", "served model",
                   "batching", "limits", "executors", "replay_dir")
replay_options = settings_options(
    *REPLAY_SETTINGS, "requests_topic", "high_priority_topic", "topic_layout",
    hidden=("requests_topic", "high_priority_topic", "topic_layout"),
    flags={"replay_dir": ("--state-dir", "--replay-dir")},
    helps={"results_topic": "Base name of the results topics, for --compare: each model's original results are "
                            "in <base>.<model> (those of the replayed window's model are compared).",
           "model": "Model to replay with.",
           "model_name": "Name the replayed results carry."})


@contextlib.contextmanager
def _reported():
    """Typed errors become one clear line and exit status 1 (click's own handling)."""
    try:
        yield
    except (ConfigError, InferlogError) as e:
        raise click.ClickException(str(e)) from None


@contextlib.contextmanager
def _stop_on_signals():
    """First SIGINT/SIGTERM: stop fetching, commit what is finished, exit. Second: at once."""
    stop = threading.Event()

    def handler(sig, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        click.echo("\nstopping: finishing and checkpointing what was fetched (again to abort)", err=True)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _emit_report(report: dict, fmt: str, json_path: Path | None) -> None:
    from .drift import format_report

    if json_path:
        json_path.write_text(json.dumps(report, indent=1))
    if fmt == "json":
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(format_report(report))


def report_options(f):
    for o in reversed([
        click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
                     help="Drift report on stdout: a table for people or JSON for machines."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also write the drift report as JSON to this file."),
        click.option("--top", default=10, show_default=True, help="How many of the most divergent requests to list."),
        click.option("--margin", default="15m", show_default=True,
                     help="Extra time read from the results topic around the window (results lag their requests)."),
    ]):
        f = o(f)
    return f


def _margin_ms(text: str) -> int:
    try:
        return parse_duration(text.lstrip("-"), bare=None)  # "15m"; "-15m" reads the same
    except ValueError as e:
        raise ConfigError(f"--margin: {e}") from None


@click.group("replay", invoke_without_command=True)
@click.option("--topic", help="Only this source topic (default: both tiers' request topics, high and normal).")
@click.option("--since", help="Window start: ISO 8601 (2026-11-23T10:00:00+01:00), naive in --tz, -2h, now.")
@click.option("--until", help="Window end (exclusive), same forms as --since (default: the end, snapshotted now).")
@click.option("--tz", help="IANA time zone for naive --since/--until (default UTC), e.g. Europe/Berlin.")
@click.option("--offsets", help='Offsets per partition, half-open: "0:100-200,3:0-50" (also "4:7-", "5"); '
                                 'name the topic ("inferlog.requests.high:0:5-9") unless --topic chose one.')
@click.option("--partitions", help="Only these partitions of each topic, e.g. 0,2.")
@click.option("--out", help="Write results to FILE.parquet or FILE.jsonl.")
@click.option("--to-topic", help="Write results to this topic, exactly once (created if missing).")
@click.option("--deadletter-topic", help="Dead letters of a --to-topic run (default: NAME.deadletter).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option("--run-id", help="Name of this run (default: generated); --resume takes it.")
@click.option("--resume", "resume_id", metavar="RUN_ID", help="Continue an interrupted run from its checkpoint "
              "(a shared run: as a member, from any host).")
@click.option("--shared", is_flag=True, help="Let other processes and hosts join this run (--join RUN_ID); "
              "needs --to-topic.")
@click.option("--define-only", is_flag=True, help="With --shared: publish the run and exit; members do the work.")
@click.option("--join", "join_id", metavar="RUN_ID", help="Take part in a shared run, from any host.")
@click.option("--compare", is_flag=True, help="When done, compare with the original results (drift report).")
@click.option("--source-model", metavar="NAME", help="Replay the requests of this served model (default: the one "
              "replayed with, by its served name); e.g. one version's window through another, for drift.")
@report_options
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a terminal).")
@replay_options
@click.option("--checkpoint-interval", type=float, help="Seconds between checkpoints (default: 0.1 topic, 2 file).")
@click.option("--stop-after", type=int, hidden=True, help="Tests: stop uncleanly after this many committed records.")
@click.pass_context
def replay(ctx, topic, since, until, tz, offsets, partitions, out, to_topic, deadletter_topic, force, run_id, resume_id,
           shared, define_only, join_id, compare, source_model, fmt, json_path, top, margin, progress,
           checkpoint_interval, stop_after, **flags):
    """Run a window of the request log through the worker's engine again.

    The window is bounded when the run starts and read by manual assignment (the live
    group's offsets never move). It covers both tiers' request topics of one model (the
    replayed one's, or --source-model's) unless --topic names one; the summary line says
    how many records came from each. A run interrupted
    by SIGINT/SIGTERM or a crash continues with `--resume RUN_ID` without reprocessing or
    skipping a record.

    \b
      inferlog replay --since 2026-11-23T10:00+01:00 --until 2026-11-23T11:00+01:00 --out r.parquet
      inferlog replay --topic inferlog.requests --offsets 0:100-200,3:0-50 --to-topic audit.replay --compare
      inferlog replay --resume r20261123-101500-ab12cd
      inferlog replay --since -1h --to-topic audit.replay --run-id audit-1 --shared   # then, on other hosts:
      inferlog replay --join audit-1
      inferlog replay compare --run-id r20261123-101500-ab12cd --format json
    """
    if ctx.invoked_subcommand is not None:
        return
    from . import runner as rr
    from .window import resolve_window

    with _reported():
        host = {k: flags.get(k) for k in ("model", "device")}  # a shared run's member may have its own
        settings = settings_from(flags)
        state_dir = settings.replay_dir
        kw = dict(progress=sys.stderr.isatty() if progress is None else progress,
                  stop_after=stop_after, checkpoint_s=checkpoint_interval, state_dir=state_dir)
        if out and (shared or define_only or join_id):
            raise rr.ReplayError(rr.SHARED_NEEDS_TOPIC)
        if resume_id or join_id:
            if any(x is not None for x in (topic, since, until, offsets, partitions, out, to_topic, run_id,
                                           source_model)) \
                    or (resume_id and join_id) or shared or define_only:
                raise click.UsageError("--resume and --join take the window, model and output from the run; "
                                       "give no other window or output options")
            with _stop_on_signals() as stop:
                summary = (rr.join if join_id else rr.resume)(settings, join_id or resume_id, stop=stop, host=host,
                                                              **kw)
        else:
            output = rr.output_spec(out, to_topic, deadletter_topic)
            if topic and source_model:
                raise click.UsageError("--topic names the window's topic; --source-model a model's: give one")
            window = resolve_window(settings, topic or _model_topics(settings, source_model), since=since,
                                    until=until, tz=tz, offsets=offsets, partitions=partitions)
            if window.total == 0:
                raise rr.ReplayError(f"the window of {', '.join(window.topics)} is empty: nothing to replay, "
                                     f"nothing written")
            from inferlog.consumer.runners import build_runner

            runner = build_runner(settings)
            _warn_other_model(settings, window, runner.info.name)
            with _stop_on_signals() as stop:
                summary = rr.start(settings, window, output, run_id=run_id, runner=runner, force=force, stop=stop,
                                   shared=shared or define_only, join=not define_only, **kw)
        if summary.status == "defined":
            click.echo(f"replay {summary.run_id} defined on {settings.replays_topic}: {summary.total:,} records of "
                       f"{', '.join(summary.topics)}; members join with: inferlog replay --join {summary.run_id}",
                       err=True)
            return
        click.echo(summary.line(), err=True)
        if summary.status != "done":
            click.echo(f"continue with: inferlog replay --resume {summary.run_id}", err=True)
            sys.exit(130)
        if compare:
            from .drift import compare_run

            ck = rr.load_run(settings, summary.run_id, state_dir)
            _emit_report(compare_run(settings, ck, top=top, margin_ms=_margin_ms(margin)), fmt, json_path)


def _model_topics(settings, source_model: str | None) -> list[str]:
    """The request topics of the model whose requests are replayed: --source-model's, else the
    replayed one's (by its served name)."""
    from inferlog.topics import request_topics

    from . import runner as rr

    name = source_model or settings.served_name
    found = request_topics(settings, [name])
    if not found:
        hint = "" if source_model else ": replaying another model's requests? name that model with --source-model NAME"
        raise rr.ReplayError(f"no request topics of model {name!r} on {settings.bootstrap_servers} "
                             f"({', '.join(settings.model_topics(name))}){hint}")
    return found


def _warn_other_model(settings, window, name: str) -> None:
    from .drift import original_models

    seen = original_models(settings, window)
    if seen and name not in seen:
        click.echo(f"warning: the original results of this window name {', '.join(seen)}; replaying with {name}",
                   err=True)


@replay.command("compare")
@click.option("--run-id", required=True, help="The replay run to compare with the original results.")
@report_options
@settings_options("connection", "results_topic", "replay_dir", flags={"replay_dir": ("--state-dir", "--replay-dir")},
                  helps={"results_topic": "Base name of the results topics: each model's original results are in "
                                          "<base>.<model>."})
def compare_cmd(run_id, fmt, json_path, top, margin, **flags):
    """Drift report of a finished (or partly finished) run against the original results."""
    from .drift import compare_run
    from .runner import load_run

    with _reported():
        settings = settings_from(flags)
        ck = load_run(settings, run_id, settings.replay_dir)  # a shared run's, from any host
        _emit_report(compare_run(settings, ck, top=top, margin_ms=_margin_ms(margin)), fmt, json_path)


AUDIT_COMMANDS = {"get": "audit_get", "sql": "audit_sql", "export": "audit_export"}


class _AuditGroup(click.Group):
    """Subcommands from replay/audit.py, imported only when used (duckdb, pyarrow)."""

    def list_commands(self, ctx):
        return sorted(AUDIT_COMMANDS)

    def get_command(self, ctx, name):
        if name not in AUDIT_COMMANDS:
            return None
        from . import audit as queries

        return getattr(queries, AUDIT_COMMANDS[name], None)


@click.group("audit", cls=_AuditGroup)
def audit():
    """What was asked, what was answered, by which model, when."""

"""The one command-line entry point: `inferlog <subcommand>`.

Each subcommand lives next to the code it drives; this module only assembles them.
Every setting is a flag and an INFERLOG_* variable (inferlog/settings.py, inferlog/options.py).
"""
from __future__ import annotations

import importlib
import sys

import click

from .errors import ConfigError, InferlogError
from .options import settings_from, settings_options

# name -> "module:attribute" of a click command or group, imported only when used so that
# `inferlog kafka status` does not pay for importing torch.
SUBCOMMANDS = {
    "kafka": ("inferlog.localkafka:kafka_cli", "Run a local Apache Kafka broker (KRaft) and manage topics."),
    "produce": ("inferlog.producer.cli:produce", "Publish requests from JSONL (file or stdin)."),
    "worker": ("inferlog.consumer.cli:worker", "Run an inference worker (long-running)."),
    "demo": ("inferlog.consumer.demo:demo", "Local Kafka + worker + a sample stream, with a summary."),
    "gateway": ("inferlog.producer.gateway:gateway_cli", "HTTP gateway: submit requests and fetch results over HTTP."),
    "replay": ("inferlog.replay.cli:replay", "Run a window of the request log through a model again."),
    "audit": ("inferlog.replay.cli:audit", "What was asked, what was answered, by which model, when."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        target, _ = SUBCOMMANDS[name]
        mod, attr = target.split(":")
        return getattr(importlib.import_module(mod), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="inferlog")
@settings_options("log_level", "log_json")
def cli(**flags) -> None:
    """inferlog: streaming inference on Kafka.

    Requests are Avro records on a partitioned topic; workers micro-batch them through a
    PyTorch/transformers model and write results exactly once.
    """
    from .telemetry import setup_logging

    settings = settings_from(flags)
    setup_logging(settings.log_level, settings.log_json)


def main() -> None:
    from .quiet import quiet_exit

    quiet_exit()  # first, so that its handler runs last at exit
    try:
        cli.main(standalone_mode=True)
    except (ConfigError, InferlogError) as e:  # raised outside click's own handling
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The README's configuration table, made from the settings (inferlog/settings.py) and the
commands' flags (inferlog/options.py): one section per group of settings, a row per setting
with its variables, the flags that set it and in which commands, its default and meaning.

    python -m inferlog.configdoc            # the table on stdout
    python -m inferlog.configdoc --readme   # written into README.md between its markers
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import click

from .options import SettingOption
from .settings import GROUPS, env_names, extra, shown_default

README_BEGIN = "<!-- settings table: written by `python -m inferlog.configdoc --readme`; do not edit -->"
README_END = "<!-- end of the settings table -->"


def _commands(cmd: click.Command, path: str, ctx: click.Context):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None:
                yield from _commands(sub, f"{path} {name}".strip(), click.Context(sub, parent=ctx, info_name=name))


def setting_flags() -> dict[str, dict[tuple[str, ...], list[str]]]:
    """{setting: {its flag names: [the commands that take them]}}, over every command."""
    from .cli import cli

    found: dict[str, dict[tuple[str, ...], list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, cmd in _commands(cli, "", click.Context(cli, info_name="inferlog")):
        for p in cmd.params:
            if isinstance(p, SettingOption) and not p.hidden:
                found[p.name][tuple(o for o in p.opts if o.startswith("--"))].append(path or "inferlog")
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def config_markdown() -> str:
    flags = setting_flags()
    out = []
    for title, model in GROUPS.items():
        out.append(f"**{title.capitalize()}.** {' '.join((model.__doc__ or '').split())}\n")
        out.append("| variable | flag (commands) | default | meaning |")
        out.append("| --- | --- | --- | --- |")
        for name, field in model.model_fields.items():
            env = " or ".join(f"`{e}`" for e in env_names(name))
            if name in flags:
                cell = "; ".join(f"{' '.join(f'`{o}`' for o in opts)} ({', '.join(cmds)})"
                                 for opts, cmds in flags[name].items())
            else:
                cell = "environment only" if extra(field, "flag", True) is False else "-"
            default = _cell(shown_default(name))
            out.append(f"| {env} | {cell} | {f'`{default}`' if default not in ('', 'none') else default or '(empty)'} | "
                       f"{_cell(field.description or '')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def with_config_table(readme: str) -> str:
    """`readme` with the text between its settings-table markers written anew."""
    head, begin, rest = readme.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not (begin and end):
        raise ValueError("the README has no settings-table markers")
    return f"{head}{README_BEGIN}\n{config_markdown()}{README_END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--readme"]:
        path = Path(sys.argv[2] if len(sys.argv) > 2 else "README.md")
        path.write_text(with_config_table(path.read_text()))
    else:
        sys.stdout.write(config_markdown())

"""Command-line flags made from the settings' fields (inferlog/settings.py), not written again
per command.

A command names the settings it takes, by field or by group:

    @settings_options("connection", "topics", "max_in_flight", flags={"requests_topic": ("--topic",)})
    def cmd(file, **flags):
        settings = settings_from(flags)   # defaults < INFERLOG_* < the flags given

Each flag's type, choices, bounds and help come from its field; its default is "not given"
(None), so that the environment and then the field's default decide. Its help names the
variable and the default, as `--help` shows. A field marked `flag: False` (a secret) has none.
"""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import click
from pydantic import SecretStr

from .settings import GROUPS, Settings, env_names, extra, load_settings, shown_default

FIELDS = Settings.model_fields


def _names(wanted: tuple[str, ...]) -> list[str]:
    names: list[str] = []
    for w in wanted:
        if w in GROUPS:
            names += [n for n, f in GROUPS[w].model_fields.items() if extra(f, "flag", True)]
        elif w in FIELDS:
            names.append(w)
        else:
            raise ValueError(f"{w!r} is neither a setting nor a group of settings")
    return names


def _bare(annotation: Any) -> Any:
    """X from X | None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _bounds(name: str) -> dict[str, Any]:
    b: dict[str, Any] = {}
    for m in FIELDS[name].metadata:
        if isinstance(m, annotated_types.Ge):
            b["min"] = m.ge
        elif isinstance(m, annotated_types.Gt):
            b["min"], b["min_open"] = m.gt, True
        elif isinstance(m, annotated_types.Le):
            b["max"] = m.le
    return b


def _click_type(name: str) -> Any:
    kind = _bare(FIELDS[name].annotation)
    if typing.get_origin(kind) is Literal:
        return click.Choice([str(v) for v in typing.get_args(kind)], case_sensitive=False)
    if kind is int:
        return click.IntRange(**{k: v for k, v in _bounds(name).items() if k != "min_open"}) if _bounds(name) else int
    if kind is float:
        return click.FloatRange(**_bounds(name)) if _bounds(name) else float
    if kind is Path:
        return click.Path(path_type=Path)
    if kind is SecretStr:
        raise ValueError(f"{name} is a secret: it is read from the environment only")
    return str


def setting_help(name: str, desc: str | None = None) -> str:
    desc = desc or " ".join((FIELDS[name].description or "").split())
    return f"{desc}  [env var: {', '.join(env_names(name))}; default: {shown_default(name)}]"


class SettingOption(click.Option):
    """A flag made from a setting (the README's table lists these, by command)."""


def setting_option(name: str, *decls: str, hidden: bool = False, help: str | None = None):
    """The flag of one setting: --its-name (or `decls`), its value under the field's name; `help`
    says what it means to this command, when the field's description does not."""
    flag = "--" + name.replace("_", "-")
    decls = decls or (flag,)
    if _bare(FIELDS[name].annotation) is bool:
        long = [d for d in decls if d.startswith("--")]
        return click.option(*(f"{d}/--no-{d[2:]}" for d in long), name, cls=SettingOption, default=None, hidden=hidden,
                            help=setting_help(name, help))
    return click.option(*decls, name, cls=SettingOption, type=_click_type(name), default=None, hidden=hidden,
                        help=setting_help(name, help))


def settings_options(*wanted: str, flags: dict[str, tuple[str, ...]] | None = None,
                     helps: dict[str, str] | None = None, hidden: tuple[str, ...] = ("faults",),
                     exclude: tuple[str, ...] = ()):
    """Flags for the named settings and groups of settings, in that order. `flags` gives a
    setting other flag names (its own is then not among them unless listed); `helps` says what
    a setting means to this command; `hidden` settings or groups take flags that --help does
    not list; `exclude` leaves settings out."""
    flags, helps = flags or {}, helps or {}
    hide = set(_names(hidden)) if hidden else set()
    names = [n for n in dict.fromkeys(_names(wanted)) if n not in exclude]

    def apply(f):
        for name in reversed(names):
            f = setting_option(name, *flags.get(name, ()), hidden=name in hide, help=helps.get(name))(f)
        return f

    return apply


def settings_from(flags: dict[str, Any], **more: Any) -> Settings:
    """The settings of a command: defaults < INFERLOG_* < the setting flags given. Takes the
    settings out of `flags` (a command's keywords), leaving its own options there."""
    given = {k: flags.pop(k) for k in list(flags) if k in FIELDS}
    return load_settings(**given, **more)

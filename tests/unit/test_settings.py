"""One source of configuration: every INFERLOG_* variable is a setting, every setting is read,
the commands' flags are made from the settings, and the README's table is the settings'."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from inferlog.cli import cli
from inferlog.configdoc import README_BEGIN, README_END, _commands, config_markdown, setting_flags
from inferlog.errors import ConfigError
from inferlog.options import SettingOption, settings_from, settings_options
from inferlog.settings import GROUPS, Settings, env_names, load_settings

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ["inferlog", "consumer", "producer", "replay"]
# build and test knobs, not settings of the product: the image's build argument, the test
# suite's deploy tools and chaos report
NOT_SETTINGS = {"INFERLOG_IMAGE_VARIANT", "INFERLOG_TOOLS_DIR", "INFERLOG_REQUIRE_DEPLOY_TOOLS",
                "INFERLOG_CHAOS_REPORT"}
ENV_NAME = re.compile(r"INFERLOG_[A-Z0-9_]*[A-Z0-9](_\*)?")


def product_files():
    for d in PRODUCT:
        yield from (REPO / d).rglob("*.py")


def all_env_names() -> set[str]:
    return {e for name in Settings.model_fields for e in env_names(name)}


def test_every_inferlog_variable_named_anywhere_is_a_setting():
    """Code, chart, Compose file, Dockerfile and docs name only variables the settings read:
    a variable renamed or dropped in settings.py leaves no stale mention behind."""
    known = all_env_names()
    files = [*product_files(), *(REPO / "helm").rglob("*"), REPO / "docker-compose.yml", REPO / "Dockerfile",
             *REPO.glob("*.md"), *(REPO / d / "README.md" for d in PRODUCT if (REPO / d / "README.md").exists())]
    stale = {}
    for f in files:
        if not f.is_file():
            continue
        for m in ENV_NAME.finditer(f.read_text(errors="ignore")):
            name = m.group(0)
            if name.endswith("_*"):  # a family, e.g. INFERLOG_SASL_*
                ok = any(k.startswith(name[:-1]) for k in known)
            else:
                ok = name in known or name in NOT_SETTINGS
            if not ok:
                stale.setdefault(name, set()).add(str(f.relative_to(REPO)))
    assert not stale, f"INFERLOG_* names that are no setting: {stale}"


def test_nothing_but_the_settings_reads_the_environment_for_inferlog():
    """No click envvar=, no os.environ/os.getenv read of an INFERLOG_* name in the product:
    only Settings reads them (writing one for a child process is fine)."""
    offenders = []
    for f in product_files():
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "envvar":
                offenders.append(f"{f.relative_to(REPO)}:{node.value.lineno} envvar=")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "getenv") \
                    and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).startswith("INFERLOG_"):
                offenders.append(f"{f.relative_to(REPO)}:{node.lineno} reads {node.args[0].value}")
    assert not offenders


def test_every_setting_is_read_by_the_product():
    """Read directly, or by a method of Settings that the product calls (served_name, worker_group...)."""
    source = "\n".join(f.read_text() for f in product_files() if f.name not in ("settings.py", "configdoc.py"))
    read = {n for n in Settings.model_fields if re.search(rf"\.{n}\b", source)}
    cls = next(n for n in ast.walk(ast.parse((REPO / "inferlog" / "settings.py").read_text()))
               if isinstance(n, ast.ClassDef) and n.name == "Settings")
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    called = {name for name in methods if re.search(rf"\.{name}\b", source)}
    while called:  # what those methods read, and the methods they call in turn
        f = methods[called.pop()]
        for node in ast.walk(f):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                if node.attr in Settings.model_fields:
                    read.add(node.attr)
                elif node.attr in methods and node.attr not in read:
                    read.add(node.attr)
                    called.add(node.attr)
    unread = [n for n in Settings.model_fields if n not in read]
    assert not unread, f"settings no code reads: {unread}"


def test_groups_partition_the_settings():
    seen = [n for g in GROUPS.values() for n in g.model_fields]
    assert sorted(seen) == sorted(Settings.model_fields)
    assert len(seen) == len(set(seen)), "a setting in two groups"
    missing = [n for n, f in Settings.model_fields.items() if not f.description]
    assert not missing, f"settings without a description: {missing}"


def test_readme_table_is_the_settings():
    readme = (REPO / "README.md").read_text()
    table = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert table.strip() == config_markdown().strip(), \
        "README's settings table is stale: python -m inferlog.configdoc --readme"


def test_every_flag_named_after_a_setting_sets_it():
    """A command's own option may not take a setting's name without being that setting's flag
    (settings_from would take it for the setting), and no command declares a flag twice."""
    for path, cmd in _commands(cli, "", click.Context(cli, info_name="inferlog")):
        opts = [o for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts]
        assert len(opts) == len(set(opts)), f"{path}: a flag declared twice"
        for p in cmd.params:
            if isinstance(p, SettingOption):
                assert p.name in Settings.model_fields
                assert env_names(p.name)[0] in (p.help or ""), f"{path} {p.opts}: help without its variable"


def test_secrets_have_no_flag():
    flags = setting_flags()
    for name in ("sasl_password", "api_keys", "jwt_secret", "gateway_id_secret"):
        assert name not in flags
    with pytest.raises(ValueError):
        settings_options("sasl_password")(lambda **kw: None)


def test_each_flag_takes_type_bounds_and_choices_from_its_field():
    @click.command()
    @settings_options("max_batch_size", "latency_target_ms", "delivery", "log_json", "log_level", "replay_dir")
    def cmd(**flags):
        s = settings_from(flags)
        click.echo(f"{s.max_batch_size} {s.latency_target_ms} {s.delivery} {s.log_json} {s.log_level} {s.replay_dir}")

    run = CliRunner().invoke
    assert run(cmd, []).output.split() == ["32", "300.0", "exactly-once", "False", "INFO", ".inferlog/replays"]
    got = run(cmd, ["--max-batch-size", "7", "--delivery", "at-least-once", "--log-json", "--log-level", "debug",
                    "--replay-dir", "/tmp/r"])
    assert got.output.split() == ["7", "300.0", "at-least-once", "True", "DEBUG", "/tmp/r"]
    for bad in (["--max-batch-size", "0"], ["--max-batch-size", "x"], ["--latency-target-ms", "0"],
                ["--delivery", "twice"]):
        r = run(cmd, bad)
        assert r.exit_code == 2 and bad[0] in r.output, (bad, r.output)


def test_precedence_defaults_then_environment_then_flags(monkeypatch):
    @click.command()
    @settings_options("batching")
    def cmd(**flags):
        s = settings_from(flags)
        click.echo(f"{s.max_batch_size} {s.max_wait_ms}")

    monkeypatch.setenv("INFERLOG_MAX_BATCH_SIZE", "9")
    monkeypatch.setenv("INFERLOG_MAX_WAIT_MS", "5")
    assert CliRunner().invoke(cmd, []).output.split() == ["9", "5.0"]
    assert CliRunner().invoke(cmd, ["--max-batch-size", "3"]).output.split() == ["3", "5.0"]


def test_a_bad_environment_or_an_unknown_setting_is_one_clear_error(monkeypatch):
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_settings(no_such_setting=1)
    monkeypatch.setenv("INFERLOG_MAX_BATCH_SIZE", "lots")
    with pytest.raises(ConfigError, match="INFERLOG_"):
        load_settings()


def test_the_cli_fails_fast_on_a_bad_variable(monkeypatch):
    monkeypatch.setenv("INFERLOG_LOG_LEVEL", "chatty")
    r = CliRunner().invoke(cli, ["kafka", "status"])
    assert r.exit_code != 0 and "INFERLOG_LOG_LEVEL='CHATTY'" in str(r.exception or r.output)


def test_a_bad_setting_is_one_line_naming_the_variable_and_the_value(monkeypatch):
    monkeypatch.setenv("INFERLOG_MAX_BATCH_SIZE", "lots")
    monkeypatch.setenv("INFERLOG_BOOTSTRAP_SERVERS", " ")
    with pytest.raises(ConfigError) as e:
        load_settings()
    text = str(e.value)
    assert "\n" not in text and "errors.pydantic.dev" not in text
    assert "INFERLOG_MAX_BATCH_SIZE='lots'" in text and "must name at least one host:port" in text
    monkeypatch.delenv("INFERLOG_MAX_BATCH_SIZE")
    monkeypatch.delenv("INFERLOG_BOOTSTRAP_SERVERS")
    with pytest.raises(ConfigError, match="max_batch_size='0'"):
        load_settings(max_batch_size=0)

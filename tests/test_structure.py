"""The shape of the project: every config setting is an option of every command that builds a
config, under its own name; README and the commands agree; no import cycle inside actsparse."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer

from actsparse.cli import app
from actsparse.config import config_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG_COMMANDS = ("eval", "calibrate", "sensitivity", "info", "sweep")
SHARED_OPTIONS = (
    "--model", "--dataset", "--calib-dataset", "--seqlen", "--calib-windows", "--calib-sample", "--dtype",
)  # fmt: skip


def options(command: str) -> set[str]:
    click_command = typer.main.get_command(app).commands[command]
    return {name for parameter in click_command.params for name in parameter.opts}


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_every_config_setting_is_an_option_of_the_same_name(command):
    found = options(command)
    expected = {"--" + setting.name.replace("_", "-") for setting in config_settings()}
    assert expected <= found, expected - found
    assert set(SHARED_OPTIONS) <= found


@pytest.mark.parametrize("command", ("eval", "calibrate", "sweep"))
def test_calibration_settings_are_options_of_the_commands_that_calibrate(command):
    assert {"--calib-steps", "--lr"} <= options(command)


def test_readme_names_every_setting_and_only_options_that_exist():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Settings (`SparsityConfig`)", 1)[1].split("\n\n", 2)[1]
    for setting in config_settings():
        assert f"`{setting.name}`" in table, setting.name
    for line in re.findall(r"^actsparse (\w+) (.*)$", readme, flags=re.MULTILINE):
        command, arguments = line
        for flag in re.findall(r"(--[a-z][a-z0-9-]*)", arguments.split("#")[0]):
            assert flag in options(command), f"README: actsparse {command} {flag}"


def _imports(path: Path) -> set[str]:
    """The actsparse modules ``path`` imports at run time (not under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actsparse"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("actsparse"))
    return found


def test_no_import_cycle_inside_actsparse():
    package = ROOT / "src" / "actsparse"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name and name != "actsparse"}
        for name, path in modules.items()
        if name != "actsparse"  # the package's __init__ only re-exports
    }
    visiting, done = [], set()

    def visit(module: str) -> None:
        if module in done or module == "actsparse":
            return
        assert module not in visiting, " → ".join(visiting[visiting.index(module) :] + [module])
        visiting.append(module)
        for imported in graph.get(module, ()):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


STUB = """#!/bin/sh
printf '%s\\n' "$*" >> "$(dirname "$0")/calls"
"""


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.sh")), ids=lambda path: path.name)
def test_every_script_behind_a_table_runs_and_names_only_options_that_exist(script, tmp_path):
    """Each script of scripts/ runs to its end with actsparse replaced by a stub that records its
    calls; every call names a command and only options it has."""
    import os
    import subprocess

    first = script.read_text().splitlines()[1]
    assert first.startswith("# ") and ("docs/" in script.read_text().split("set -euo")[0]), script.name
    for name in ("actsparse", "python"):
        (tmp_path / name).write_text(STUB)
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "ACTSPARSE": str(tmp_path / "actsparse")}
    work = tmp_path / "work"
    (work / "docs").mkdir(parents=True)
    (work / "docs" / "variants").symlink_to(ROOT / "docs" / "variants")
    done = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    calls = [line.split() for line in (tmp_path / "calls").read_text().splitlines() if line]
    commands = [call for call in calls if call and call[0] in CONFIG_COMMANDS]
    assert commands, f"{script.name} runs no actsparse command"
    for command, *arguments in commands:
        unknown = {a.split("=")[0] for a in arguments if a.startswith("--")} - options(command)
        assert not unknown, f"{script.name}: actsparse {command} has no {sorted(unknown)}"

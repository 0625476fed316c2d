"""The shape of the project: every config setting is an option of every command that builds a
config, under its own name; README and the commands agree; imports run down the layers of actsparse."""

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
    assert "--mitigation" in found  # the old name of --corrections, still accepted


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


LAYERS = {
    "version": 0,
    "kernels": 0,
    "core": 1,
    "pieces": 2,
    "config": 3,
    "io": 4,
    "sparse": 5,
    "calibration": 6,
    "pipeline": 7,
    "eval": 8,
    "cli": 9,
    "__main__": 10,
    "": 10,  # the package's __init__: the public API
}
"""The layers of actsparse from the bottom up: a module may import its own layer and those below."""


def _modules() -> dict[str, Path]:
    package = ROOT / "src" / "actsparse"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every actsparse module ``path`` imports: at run time, under ``if TYPE_CHECKING:`` and inside
    functions alike (``from actsparse.pieces import base`` imports ``actsparse.pieces.base``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actsparse"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("actsparse"))
    return found & known


def _layer(module: str) -> int:
    return LAYERS[module.removeprefix("actsparse").removeprefix(".").split(".")[0]]


def test_every_module_belongs_to_a_layer():
    for module in _modules():
        assert module.removeprefix("actsparse").removeprefix(".").split(".")[0] in LAYERS, module


def test_type_only_and_function_local_imports_count(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from actsparse import kernels\n"
        "if TYPE_CHECKING:\n    from actsparse.sparse.layer import SparseLinear\n"
        "def f():\n    from actsparse.cli import app\n    import actsparse.eval.sweep\n"
    )
    known = {"actsparse", "actsparse.kernels", "actsparse.sparse.layer", "actsparse.cli"}
    known.add("actsparse.eval.sweep")
    assert _imports(source, known) == known - {"actsparse"}


def test_imports_run_down_the_layers_without_a_cycle():
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    for module, imported in graph.items():
        for target in imported:
            assert _layer(target) <= _layer(module), f"{module} imports {target}, a layer above it"
    visiting, done = [], set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, " → ".join(visiting[visiting.index(module) :] + [module])
        visiting.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_every_command_is_at_most_40_lines_and_declares_no_run_option_itself():
    """A command parses and calls: its options come from the declarations in actsparse.cli.options."""
    from actsparse.cli import commands
    from actsparse.cli.options import RUN_OPTIONS

    callbacks = [command.callback for command in typer.main.get_command(app).commands.values()]
    command_functions = {getattr(callback, "__wrapped__", callback) for callback in callbacks}
    names = {function.__name__ for function in command_functions}
    checked = set()
    for node in ast.parse(Path(commands.__file__).read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            lines = node.end_lineno - node.lineno + 1 + len(node.decorator_list)
            assert lines <= 40, f"{node.name} is {lines} lines"
            own = {a.arg for a in node.args.args + node.args.kwonlyargs}
            if "run" in own:
                assert not own & set(RUN_OPTIONS), f"{node.name} declares {own & set(RUN_OPTIONS)} itself"
            checked.add(node.name)
    assert checked == names and {"eval_command", "calibrate", "sweep", "sensitivity", "info"} <= checked


OWN_OR_LIBRARY_OBJECTS = {
    ("actsparse.cli.options", "wrapper.__signature__"),  # the command's own wrapper function
    ("actsparse.core.cpu", "linear.weight.data"),  # a layer it builds to time the dense products
    ("actsparse.core.devices", "carried.weights_map"),  # accelerate's offload hook, carried over
    ("actsparse.core.devices", "carried.tied_params_names"),
    ("actsparse.io.models", "model.hf_quantizer"),  # transformers' model, dequantised
    ("actsparse.io.text", "member.name"),  # a tar member it reads
    ("actsparse.kernels", "(function.restype, function.argtypes)"),  # ctypes' signatures
}
"""Attribute assignments on objects other than ``self``: each on the module's own objects or on a
library's, never on another actsparse module's (those change through their owner's methods)."""


def _root(node: ast.expr) -> str | None:
    """The name an attribute chain starts from (``self`` for ``self.weight.data``)."""
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def test_no_module_assigns_attributes_on_another_modules_objects():
    found = set()
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                stores = [
                    s
                    for s in ast.walk(target)
                    if isinstance(s, ast.Attribute) and isinstance(s.ctx, ast.Store)
                ]
                if any(_root(store.value) not in ("self", "cls") for store in stores):
                    found.add((module, ast.unparse(target)))
    assert found == OWN_OR_LIBRARY_OBJECTS, found ^ OWN_OR_LIBRARY_OBJECTS


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
    done = subprocess.run(
        ["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    calls = [line.split() for line in (tmp_path / "calls").read_text().splitlines() if line]
    commands = [call for call in calls if call and call[0] in CONFIG_COMMANDS]
    assert commands, f"{script.name} runs no actsparse command"
    for command, *arguments in commands:
        unknown = {a.split("=")[0] for a in arguments if a.startswith("--")} - options(command)
        assert not unknown, f"{script.name}: actsparse {command} has no {sorted(unknown)}"

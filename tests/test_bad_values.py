"""Every option of every command, fed bad values generated from its definition (its type, and for
paths whether a file or a folder is written): exit status 2, one line on stderr naming the problem,
no traceback, and no file written or changed. A new option is covered without a new test."""

from __future__ import annotations

import re
import sys

import pytest
import typer

from actsparse.cli import app, main

COMMANDS = typer.main.get_command(app).commands
FOLDER_OUTPUTS = {("calibrate", "out"), ("sweep", "out")}
"""Options naming a folder actsparse writes; every other ``out`` / ``markdown`` names a file."""
PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]")


def baseline(command: str, folder, model, text) -> list[str]:
    """Valid arguments of ``command`` on the tiny model and text, so that one bad value is the only fault."""
    if command == "prepare":
        return ["--model", str(model), "--dataset", str(text)]
    if command == "models":
        return []
    args = ["--model", str(model), "--dataset", str(text), "--seqlen", "16"]
    outputs = {
        "eval": ["--windows", "1", "--out", str(folder / "eval.json")],
        "calibrate": ["--calib-windows", "2", "--calib-steps", "1", "--out", str(folder / "recipe")],
        "sweep": ["--windows", "1", "--out", str(folder / "sweep")],
        "sensitivity": ["--calib-windows", "2", "--out", str(folder / "sensitivity.json")],
        "info": [],
    }
    return args + outputs[command]


def bad_values(command: str, parameter, folder) -> list[str]:
    """Bad values for one option, from its type."""
    kind = parameter.bare_type()
    if kind == "int":
        return ["-1", "many"]
    if kind == "float":
        return ["-1", "much"]
    if "Path" in kind:
        if parameter.name in ("out", "markdown"):
            if (command, parameter.name) in FOLDER_OUTPUTS:
                return [str(folder / "a-file.txt")]  # a file where a folder would be written
            return [str(folder)]  # a folder where a file would be written
        return [str(folder / "missing")]
    return ["no-such-thing"]


def cases():
    for command, click_command in COMMANDS.items():
        for parameter in click_command.params:
            if parameter.is_flag:
                continue
            yield pytest.param(command, parameter.name, id=f"{command}--{parameter.name}")


def snapshot(folder):
    """Every file with its size and time, every folder by name (a lock taken and given back changes
    only its folder's time)."""
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder" for p in folder.rglob("*")
    }


@pytest.mark.parametrize("command, name", list(cases()))
def test_every_option_refuses_bad_values_with_one_line(
    command, name, local_model, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    model, text = local_model
    work = tmp_path / "work"
    work.mkdir()
    (work / "a-file.txt").write_text("a file of the user's")
    parameter = next(p for p in COMMANDS[command].params if p.name == name)
    flag = parameter.opts[0]
    for value in bad_values(command, parameter, work):
        before = snapshot(tmp_path)
        capsys.readouterr()
        monkeypatch.setattr(
            sys, "argv", ["actsparse", command, *baseline(command, work, model, text), flag, value]
        )
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.search(line)]
        assert exit_info.value.code == 2, (flag, value, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (flag, value, err)
        assert "Traceback" not in err
        assert snapshot(tmp_path) == before, (flag, value, "left files behind")

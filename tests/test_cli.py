"""User mistakes on the command line: one sentence on stderr, exit status 2, no traceback."""

import sys

import pytest

from actsparse.cli import main


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["actsparse", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--pattern", "4:2"], "Pattern '4:2' keeps 4 of 2"),
        (["eval", "--criterion", "topk"], "Unknown criterion 'topk'"),
        (["eval", "--model", "./missing-model"], "Model './missing-model' was not found"),
        (["eval", "--phase", "decode"], "Unknown phase 'decode'"),
        (["info", "--model", "./missing-model"], "was not found"),
        (["info", "--pattern", "2:4,8:16"], "describes one configuration"),
        (["eval", "--pattern", ","], "Give at least one --pattern"),
    ],
)
def test_user_errors_exit_2_with_one_sentence(monkeypatch, capsys, args, message):
    code, output = run(monkeypatch, capsys, *args)
    assert code == 2
    assert message in " ".join(output.split())
    assert "Traceback" not in output


def test_models_lists_the_embedded_models(monkeypatch, capsys):
    code, output = run(monkeypatch, capsys, "models")
    assert code in (0, None)
    assert "smollm2-135m" in output and "gemma3-270m" in output

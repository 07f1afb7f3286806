"""The `tte` dispatcher: help, unknown commands, and the deepspeed launcher's --local_rank."""
import os
import re

import pytest

from unified_tte.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    # One line per command that starts with its name: a bare `name in out` is also met by the
    # descriptions ("train, evaluate, export and bench ..." names four other commands).
    assert re.findall(r"^  (\S+) +\S", out, re.M) == list(SUBCOMMANDS)


def test_unknown_command_is_refused_with_the_list(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "tte: error: unknown command 'trian'" in err and "train" in err


def test_launcher_local_rank_before_the_subcommand_is_ignored(capsys):
    # deepspeed runs `tte --local_rank=0 train ...`; the rank comes from the environment
    assert main(["--local_rank=0", "--help"]) == 0
    assert "usage: tte" in capsys.readouterr().out


BAD_INPUT = {
    # command: arguments that are wrong before any model loads
    "demo": lambda tmp: ["--quick", "--no-bench", "--out", str(tmp / "a_file")],
    "train": lambda tmp: [str(tmp / "missing.yaml")],
    "traces": lambda tmp: ["--model", "tiny", "--data", str(tmp / "missing.jsonl"), "--out", str(tmp / "t.jsonl")],
    "eval": lambda tmp: [str(tmp / "no_such_checkpoint")],
    "export": lambda tmp: [str(tmp / "no_such_run"), "--out", str(tmp / "ck")],
    "bench": lambda tmp: ["--modes", "activated,bogus"],
    "doctor": lambda tmp: ["--json", str(tmp / "no_such_folder" / "doctor.json")],
    "plan": lambda tmp: [str(tmp / "missing.yaml"), "--gpus", "8"],
}


def test_every_command_has_a_bad_input_case():
    assert set(BAD_INPUT) == set(SUBCOMMANDS)


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_bad_input_is_one_line_with_the_prefix_and_exit_code_2(command, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    code = main([command, *BAD_INPUT[command](tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tte {command}: error: "), err
    assert str(tmp_path) in last or command == "bench", last   # it names the file or folder


def test_debug_prints_the_traceback_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TTE_DEBUG", "0")   # restored by monkeypatch whatever happens below
    assert main(["--debug", "eval", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("tte eval: error: ")
    assert os.environ["TTE_DEBUG"] == "0"   # --debug lasts for its command only


def test_help_documents_the_exit_codes(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "2 = bad input" in out and "1 = a run that started and failed" in out

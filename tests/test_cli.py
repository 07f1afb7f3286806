"""The `tte` dispatcher: help, unknown commands, and the deepspeed launcher's --local_rank."""
from unified_tte.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_unknown_command_is_refused_with_the_list(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err


def test_launcher_local_rank_before_the_subcommand_is_ignored(capsys):
    # deepspeed runs `tte --local_rank=0 train ...`; the rank comes from the environment
    assert main(["--local_rank=0", "--help"]) == 0
    assert "usage: tte" in capsys.readouterr().out

"""`python -m rewiring --help` lists every command, and each non-training command has its own help."""

from __future__ import annotations

import pytest

from rewiring.cli import main


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "prepare", "synthesize", "isotropy", "sweep", "compare", "bench"):
        assert f"  {command} " in out


@pytest.mark.parametrize("command", ["prepare", "synthesize", "isotropy", "compare", "bench", "sweep"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["frobnicate"])
    assert done.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err

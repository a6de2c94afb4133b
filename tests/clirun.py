"""Running the griffin-export command line inside a test."""

from __future__ import annotations

import pytest

from griffin_export_cli.main import main


def run(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `griffin-export ARGV`; every argument is str()-ed."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err

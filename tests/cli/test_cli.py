"""The CLI as a whole: every command registered, every --help renders, no command imports break."""

import subprocess
import sys

import pytest

from zfnet.cli import COMMANDS, build_parser, main

NAMES = [c[0] for c in COMMANDS]


def test_all_paper_commands_exist():
    for name in ["predict", "layers", "project", "atlas", "occlude", "invariance", "correspond", "train",
                 "evolution", "diagnose", "ablate", "probe", "fewshot", "overlap"]:
        assert name in NAMES, name


@pytest.mark.parametrize("name", NAMES)
def test_help_renders(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0 and name in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2 and "COMMAND" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "zfnet", "layers", "--model", "zfnet", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '"conv1"' in r.stdout and r.stderr == ""

"""The ``resnet-imagenet`` parser: every command of tools.COMMANDS is listed and builds, --help stays torch-free."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from resnet_imagenet import cli
from resnet_imagenet._version import __version__
from resnet_imagenet.tools import COMMANDS


def _run(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter (this one has torch imported already), wide enough that help texts do not wrap."""
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)


def test_help_lists_every_command_without_torch() -> None:
    p = _run(
        "-c",
        "import sys\n"
        "from resnet_imagenet import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'cv2', 'lmdb') if m in sys.modules)\n"
        "tools = sorted(m for m in sys.modules if m.startswith('resnet_imagenet.tools.'))\n"
        "print('IMPORTED', heavy, tools)\n",
    )
    assert p.returncode == 0, p.stderr
    assert "IMPORTED [] []" in p.stdout  # no heavy package and no tool module for --help
    listed = p.stdout.split("IMPORTED")[0]
    for name, (_, help_text) in COMMANDS.items():  # its name, then its help (on the next line after a long name)
        assert re.search(rf"^    {name}\s+{re.escape(help_text)}$", listed, re.M), name


def test_module_help_in_a_subprocess() -> None:
    p = _run("-m", "resnet_imagenet", "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: resnet-imagenet")
    assert all(re.search(rf"^    {name}\s", p.stdout, re.M) for name in COMMANDS)


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"resnet-imagenet {__version__}\n"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_builds_and_helps(name: str, capsys) -> None:
    parser = cli.build_parser(name)
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices[name].get_default("func") is not None  # the module built this command's flags
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: resnet-imagenet {name}")


def test_full_parser_has_every_command_with_its_handler() -> None:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    assert all(p.get_default("func") is not None for p in sub.choices.values())


def test_unknown_command_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["no_such_command"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "resnet-imagenet: error: argument COMMAND: invalid choice: 'no_such_command'" in err

"""The ``resnet-imagenet`` command: one subcommand per Caffe tool. The only module that reads argv.

The parser lists every command from tools.COMMANDS but builds the flags of the chosen command only, by
importing its module (resnet_imagenet.tools.<module>); so ``--help`` and light commands start fast.
Caffe's single-dash spelling (``train -solver s.prototxt -gpu 0,1``, ``-iterations=50``) works for every
command: caffe_flags rewrites it to the long options before argparse reads argv.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from resnet_imagenet._version import __version__
from resnet_imagenet.tools import COMMANDS
from resnet_imagenet.util.glog import error_line, setup_logging
from resnet_imagenet.util.interrupt import Interrupted

log = logging.getLogger("resnet_imagenet")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s flags are built (None: every command's, e.g. for documentation)."""
    parser = argparse.ArgumentParser(
        prog="resnet-imagenet",
        description="Caffe's tools for ResNets on ImageNet, running on PyTorch.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    built: set[str] = set()
    for name, (module, help_text) in COMMANDS.items():
        if command is None or COMMANDS.get(command, ("",))[0] == module:
            if module not in built:  # the module adds all of its commands
                importlib.import_module(f"resnet_imagenet.tools.{module}").add_parser(sub)
                built.add(module)
        else:
            sub.add_parser(name, help=help_text)
    return parser


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _long_options(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse.Action]:
    """``command``'s long options (``--name``) and their actions; empty for an unknown command."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    p = sub.choices.get(command) if sub is not None else None
    if p is None:
        return {}
    return {o: a for a in p._actions for o in a.option_strings if o.startswith("--")}


def caffe_flags(argv: list[str], command: str, options: dict[str, argparse.Action]) -> list[str]:
    """Caffe's gflags spellings after ``command`` as our long options: ``-name``, ``-name=value`` (also with
    ``_`` for ``-``, as ``-sighup_effect``) become ``--name``; ``-flag=true``/``-flag=false`` on a switch becomes
    the switch or nothing. Other tokens stay: short options (-o, -h), negative numbers (-1), values."""
    if command not in argv:
        return argv
    at = argv.index(command) + 1
    out = argv[:at]
    for tok in argv[at:]:
        if tok.startswith("-") and not tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok[1:].partition("=")
            opt = next((o for o in (f"--{name}", f"--{name.replace('_', '-')}") if o in options), None)
            if opt is not None:
                action = options[opt]
                if eq and action.nargs == 0 and value.lower() in _BOOL_WORDS:
                    # gflags' -shuffle=true / -gray=false on a switch: the switch given, or not given
                    if _BOOL_WORDS[value.lower()]:
                        out.append(opt)
                    continue
                tok = opt + eq + value
        out.append(tok)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command)
    args = parser.parse_args(caffe_flags(argv, command, _long_options(parser, command)))
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        # Bad input: one clear line, no traceback (use -v for one).
        if args.verbose:
            log.exception("failed")
        error_line(f"resnet-imagenet {args.command}: error: {e}")
        return 1
    except Interrupted as e:  # SIGINT / SIGTERM where a command cleans up (util/interrupt.py): one line
        error_line(f"resnet-imagenet {args.command}: {e}")
        return e.code
    except KeyboardInterrupt:
        return 130

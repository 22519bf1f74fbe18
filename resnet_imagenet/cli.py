"""The ``resnet-imagenet`` command: one subcommand per Caffe tool. The only module that reads argv.

The parser lists every command from tools.COMMANDS but builds the flags of the chosen command only, by
importing its module (resnet_imagenet.tools.<module>); so ``--help`` and light commands start fast.
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
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

"""Caffe's (glog's) log line format, logging setup, and the one-line error writer used by every command."""

from __future__ import annotations

import logging
import sys
import time


class CaffeFormatter(logging.Formatter):
    """glog's line prefix, as Caffe prints it: ``I0111 18:29:31.675417 31329 solver.cpp:228] msg``.

    Caffe's tools/extra/parse_log.py reads the time from this prefix, so our logs keep it.
    """

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1e6)
        prefix = (
            f"{record.levelname[0]}{time.strftime('%m%d %H:%M:%S', t)}.{micros:06d} "
            f"{record.process} {record.filename}:{record.lineno}]"
        )
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f"{prefix} {msg}"


def error_line(text: str) -> None:
    """One ``resnet-imagenet CMD: error: ...`` line in a single write, so lines from several processes
    sharing stderr (torchrun's ranks) never run together (print writes the newline separately)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CaffeFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)

"""``upgrade_net_proto_text`` and ``upgrade_net_proto_binary``: Caffe's tools -- write a V0/V1 net prototxt or
caffemodel in today's format (proto/upgrade.py; blobs kept, byte for byte)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import read_binary_proto
from resnet_imagenet.proto.text import read_message, to_text, upgrade_net
from resnet_imagenet.tools import add_command
from resnet_imagenet.util.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, what in (("upgrade_net_proto_text", "net prototxt"), ("upgrade_net_proto_binary", "caffemodel")):
        p = add_command(sub, name)
        p.add_argument("input", metavar="IN", help=f"old {what}")
        p.add_argument("output", metavar="OUT", help=f"upgraded {what} to write (not IN)")
        p.set_defaults(func=run, binary=name.endswith("binary"))


def upgrade_file(src: str | os.PathLike, dst: str | os.PathLike, binary: bool) -> list[str]:
    """Upgrade net file ``src`` into ``dst`` (through a temporary file); returns what was upgraded."""
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError(f"{dst}: the output would overwrite the input; give another OUT")
    if binary:
        net = read_binary_proto(src, caffe_pb2.NetParameter(), "caffemodel (binary NetParameter)")
    else:
        net = read_message(src, caffe_pb2.NetParameter())
    done = upgrade_net(net, str(src))
    if not done:
        log.info("File already in latest proto format: %s", src)  # caffe: written all the same
    if binary:
        atomic_write_bytes(dst, net.SerializeToString())
    else:
        atomic_write_text(dst, to_text(net))
    log.info("Wrote upgraded NetParameter %s to %s", "binary proto" if binary else "text proto", dst)
    return done


def run(args: argparse.Namespace) -> int:
    upgrade_file(args.input, args.output, args.binary)
    return 0

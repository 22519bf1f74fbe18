"""Regenerate caffe_pb2.py from caffe.proto: ``python -m resnet_imagenet.proto.generate``.

Needs grpcio-tools (a dev dependency), which bundles protoc. The generated module is
committed so that users need only the protobuf runtime. protoc >= 26 stamps a runtime
version check into the module that would demand a protobuf runtime at least as new as
the protoc that made it; we strip it, since the builder API the module uses exists in
every protobuf since 3.20.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_VERSION_CHECK = re.compile(
    r"from google\.protobuf import runtime_version as _runtime_version\n"
    r"|_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:    .*\n)*?\)\n"
)


def main() -> int:
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={HERE}", str(HERE / "caffe.proto")])
    if rc != 0:
        return rc
    out = HERE / "caffe_pb2.py"
    out.write_text(_VERSION_CHECK.sub("", out.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the Python code for protos/fedsite.proto.

The generated files are committed (users need no protoc); the drift test in
tests/protos runs this into a temporary folder and compares byte for byte.
Run from anywhere: ``python -m protos.generate``.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_NAME = "fedsite.proto"
GENERATED = ("fedsite_pb2.py", "fedsite_pb2.pyi", "fedsite_pb2_grpc.py")


def generate(output_root: Path) -> list[Path]:
    """Write the generated modules under ``output_root/protos/``; return their paths."""
    from grpc_tools import protoc  # noqa: PLC0415 - a dev dependency, imported late

    repo_root = Path(__file__).resolve().parent.parent
    (output_root / "protos").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{repo_root}",
        f"--python_out={output_root}",
        f"--pyi_out={output_root}",
        f"--grpc_python_out={output_root}",
        f"protos/{PROTO_NAME}",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on protos/" + PROTO_NAME)
    return [output_root / "protos" / name for name in GENERATED]


if __name__ == "__main__":
    paths = generate(Path(__file__).resolve().parent.parent)
    sys.stdout.write("\n".join(str(p) for p in paths) + "\n")

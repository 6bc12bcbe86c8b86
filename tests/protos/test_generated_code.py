"""The committed generated code is exactly what grpcio-tools makes from the .proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos.generate import GENERATED, generate

PROTOS = Path(__file__).resolve().parents[2] / "protos"


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    for path in generate(tmp_path):
        committed = PROTOS / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"protos/{path.name} is stale: run `python -m protos.generate` and commit the result"
        )
    assert {p.name for p in (tmp_path / "protos").iterdir()} >= set(GENERATED)

"""Offsite mode's package: what a client downloads holds none of the dropped blocks.

Built through the coordinator's own job preparation, on a tiny BERT with the
real tokenizer; the check is by hash over every tensor in every file of the
package tar (what FetchPackage streams) and of a round's task message.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from client.data import read_examples, write_jsonl
from coordinator.config import parse_job
from coordinator.job import prepare_job
from emulator.models import load_model
from emulator.offsite import EmulatorLayout, tensor_digest
from protos.codec import decode_message, encode_message

REPO = Path(__file__).resolve().parents[2]
VALIDATION = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"


def test_the_package_and_round_messages_carry_no_dropped_block(tiny_bert_dir: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "val.jsonl", read_examples(VALIDATION, need_label=True)[:100])
    config = parse_job({
        "job": {"name": "off", "mode": "offsite", "rounds": 1, "clients_per_round": 2, "min_clients": 1},
        "model": {"path": str(tiny_bert_dir), "max_length": 32},
        "data": {"validation": str(tmp_path / "val.jsonl")},
        "offsite": {"adapter_layers": 1, "keep": 1},
    }, tmp_path)
    job = prepare_job(config, tmp_path / "out")
    layout = EmulatorLayout.load(job.package.folder / "model")
    assert layout.adapter_full_indices == [0, 3] and layout.kept_middle in ([1], [2])
    dropped = sorted(set(range(4)) - set(layout.adapter_full_indices) - set(layout.kept_middle))
    assert dropped

    full = load_model(tiny_bert_dir, "classification", job.package.spec.labels, seed=0)
    prefix = "bert.encoder.layer."
    in_dropped = {name for name in full.state_dict() if any(name.startswith(f"{prefix}{i}.") for i in dropped)}
    elsewhere = {tensor_digest(t) for name, t in full.state_dict().items() if name not in in_dropped}
    # freshly initialised LayerNorms and biases are identical in every block: only tensors that
    # exist nowhere else in the model identify a dropped block
    dropped_digests = {tensor_digest(full.state_dict()[name]) for name in in_dropped} - elsewhere
    kept_digests = {tensor_digest(t) for name, t in full.state_dict().items()
                    if name.startswith(f"{prefix}{layout.adapter_full_indices[0]}.")}
    assert dropped_digests

    shipped: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(job.package.blob)) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".safetensors"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                shipped |= {tensor_digest(t) for t in load_safetensors(data).values()}
    message = decode_message(encode_message(job.engine.train_message(1, 2)))
    round_digests = {tensor_digest(t) for t in message.tensors.values()}

    assert shipped and kept_digests <= shipped  # the check can see blocks that do ship...
    assert not (dropped_digests & shipped)  # ...and none of the dropped ones is in the package
    assert not (dropped_digests & round_digests)
    # a round carries the adapter blocks (emulator numbering) and the head, nothing of the middle
    blocks = {int(name[len(prefix):].split(".")[0]) for name in message.tensors if name.startswith(prefix)}
    assert blocks == set(layout.adapter_emulator_indices)
    assert torch.equal(message.tensors["classifier.weight"], full.state_dict()["classifier.weight"])

"""The Flower simulation for real: Ray actors, the Grid, our engine; a tiny random BERT with the MiniLM tokenizer.

One simulation of the whole job (outputs, bytes), one that drives the
FlowerDriver by hand (client errors, deadlines, unknown clients, and a reply
bit-identical to the same ClientRuntime run in this process), and the
per-actor cache without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from client.runtime import DATA_SEED_KEY, ClientRuntime
from coordinator.checkpoint import Checkpointer
from coordinator.config import load_job
from coordinator.engine import Exchange
from localio.data import read_examples
from protos.codec import Message, encode_message
from protos.wire import Stage, TrainInstruction
from simulations.flower_app import (
    _STATE,
    ClientSettings,
    actor_cache_sizes,
    client_runtime,
    make_client_app,
)
from simulations.flower_driver import FlowerDriver, client_id_for
from simulations.harness.tiny_jobs import make_tiny_bert, tiny_job
from simulations.runner import SimulationOptions, _run_flower, backend_config, run_job

CLIENTS, PER_ROUND, ROUNDS = 8, 4, 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("sim")
    model = make_tiny_bert(work / "tiny-bert")
    job = tiny_job(work, model, clients=CLIENTS, per_round=PER_ROUND, rounds=ROUNDS, max_train_examples=800)
    out = work / "run"
    run_job(load_job(job), out, SimulationOptions(progress=False, object_store_mb=100))
    return out


def _settings(run: Path, **kwargs: Any) -> ClientSettings:
    config = json.loads((run / "job.toml.json").read_text())
    return ClientSettings(package_dir=str(run / "package"), train_data=config["simulation"]["train_data"],
                          partitions_file=str(run / "partitions.json"), output_dir=str(run), **kwargs)


def test_a_simulated_job_writes_every_output(tiny_run: Path) -> None:
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    for r in records[1:]:
        assert r["status"] == "ok" and r["completed_clients"] == PER_ROUND and r["dropped_clients"] == 0
        assert "val_accuracy" in r
    # bytes_down is exactly the gRPC driver's payload: the encoded train message, once per sampled client
    state = Checkpointer(tiny_run / "checkpoints").latest().global_state  # type: ignore[union-attr]
    config = TrainInstruction(local_steps=2, batch_size=8, physical_batch_size=64, cache_frozen_prefix=True,
                              lr=1e-3, weight_decay=0.0, head_lr=0.0, seed=0).to_config()
    for r in records[1:]:
        blob = encode_message(Message(round=r["round"], stage=Stage.TRAIN, config=config, tensors=state))
        assert r["bytes_down"] == PER_ROUND * len(blob)
        assert r["bytes_up"] > PER_ROUND * sum(t.numel() * 4 for t in state.values())
    table = json.loads((tiny_run / "partitions.json").read_text())
    assert len(table) == CLIENTS and sum(map(len, table)) == 800
    assert 0 < len(list((tiny_run / "clients").iterdir())) <= CLIENTS  # state dirs of sampled clients only
    for name in ("report.md", "val_accuracy.png", "bytes.png", "plots.json", "final/config.json",
                 "final/adapter/adapter_config.json"):
        assert (tiny_run / name).exists(), name
    from transformers import AutoModelForSequenceClassification

    final = AutoModelForSequenceClassification.from_pretrained(tiny_run / "final")
    assert len(final.config.id2label) == 45


def test_driver_maps_errors_deadlines_and_unknown_clients_and_moves_exact_bytes(tiny_run: Path) -> None:
    state = Checkpointer(tiny_run / "checkpoints").latest().global_state  # type: ignore[union-attr]
    config = TrainInstruction(local_steps=3, batch_size=8, lr=1e-3, weight_decay=0.0, seed=5).to_config()
    good = Message(round=1, stage=Stage.TRAIN, config=config, tensors=state)
    bogus = Message(round=1, stage="no-such-stage")
    late = Message(round=2, stage=Stage.TRAIN, config=config, tensors=state)
    seen: dict[str, Any] = {}

    def scenario(driver: FlowerDriver) -> None:
        try:
            seen["clients"] = driver.wait_for_clients(CLIENTS, 120)
            c0, c1, c2 = client_id_for(0), client_id_for(1), client_id_for(2)
            seen["first"] = driver.exchange(1, {c0: bogus, c1: good, "client-99999": good}, 300)
            seen["second"] = driver.exchange(2, {c2: late}, 0.001)
        except BaseException as exc:
            seen["error"] = exc

    settings = _settings(tiny_run, threads=1)
    _run_flower(scenario, make_client_app(settings), CLIENTS,
                backend_config(SimulationOptions(object_store_mb=100)))
    assert "error" not in seen, seen.get("error")
    assert seen["clients"] == [client_id_for(i) for i in range(CLIENTS)]
    first: Exchange = seen["first"]
    assert set(first.replies) == {client_id_for(1)}
    assert "client error" in first.failures[client_id_for(0)] and "no-such-stage" in first.failures[client_id_for(0)]
    assert "unknown client" in first.failures["client-99999"]
    assert first.bytes_down == len(encode_message(bogus)) + len(encode_message(good))
    reply = first.replies[client_id_for(1)]
    assert first.bytes_up == len(encode_message(reply))
    second: Exchange = seen["second"]
    assert second.replies == {} and second.failures == {client_id_for(2): "no reply before the round deadline"}

    # the reply equals the same client's ClientRuntime run here, bit for bit
    rows = read_examples(settings.train_data, need_label=True)
    part = json.loads(Path(settings.partitions_file).read_text())[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = ClientRuntime.from_package(tiny_run / "package", [rows[i] for i in part], state_dir=None).handle(good)
    finally:
        torch.set_num_threads(threads)
    assert local.config["num_examples"] == reply.config["num_examples"] == len(part)
    assert set(local.tensors) == set(reply.tensors)
    assert all(torch.equal(local.tensors[k], reply.tensors[k]) for k in local.tensors)


def test_actor_cache_shares_one_model_and_keeps_a_bounded_lru(tiny_run: Path) -> None:
    _STATE.clear()
    try:
        settings = _settings(tiny_run, threads=torch.get_num_threads(), cache_clients=3)
        runtimes = [client_runtime(settings, p) for p in range(CLIENTS)]
        # a runtime encodes its examples only when something reads them (SecAgg+ key stages never do)
        assert actor_cache_sizes() == {"models": 1, "train_files": 0, "datasets": 0}
        assert all(r.data is None for r in runtimes)
        table = json.loads(Path(settings.partitions_file).read_text())
        assert [len(r.examples) for r in runtimes] == [len(p) for p in table]
        assert actor_cache_sizes() == {"models": 1, "train_files": 1, "datasets": 3}
        assert all(r.model is runtimes[0].model for r in runtimes)
        again = client_runtime(settings, CLIENTS - 1)
        assert again is not runtimes[-1] and again.examples is runtimes[-1].examples  # fresh runtime, cached data
        seed = runtimes[-1].data_seed  # hashed once per encoded dataset, not once per runtime
        assert again.examples.cache[DATA_SEED_KEY] == seed == again.data_seed
        assert client_runtime(settings, 0).data_seed == runtimes[0].data_seed  # re-encoded: the same seed
        assert client_runtime(settings, 0).examples is not runtimes[0].examples  # evicted, encoded again
        assert runtimes[3].state_dir == tiny_run / "clients" / "3"
        with pytest.raises(ValueError, match="outside the 8 partitions"):
            _ = client_runtime(settings, CLIENTS).examples
    finally:
        _STATE.clear()


def test_secure_aggregation_and_local_dp_run_across_actors(tmp_path: Path) -> None:
    """SecAgg+ stages of one client may land on different Ray actors, and a client may train on a
    different actor each round: its protocol state and its privacy ledger must follow it."""
    from privacy.accounting import PrivacyLedger

    model = make_tiny_bert(tmp_path / "tiny-bert")
    job = tiny_job(tmp_path, model, clients=4, per_round=4, rounds=3, max_train_examples=400, name="private")
    job.write_text(job.read_text() + """
[privacy.local_dp]
enabled = true
noise_multiplier = 1.0
max_grad_norm = 1.0
max_epsilon = 100.0

[privacy.secure_aggregation]
enabled = true
""")
    out = tmp_path / "run"
    run_job(load_job(job), out, SimulationOptions(progress=False, object_store_mb=100))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["status"] for r in records] == ["ok"] * 3, records
    assert [r["completed_clients"] for r in records] == [4, 4, 4] and all(r["dropped_clients"] == 0 for r in records)
    # after round 1 every client's SecAgg+ keys were made ahead (kept in its node's Context across actors)
    assert [r["secagg_keyed_clients"] for r in records] == [0, 4, 4]
    eps = [r["epsilon_local_max"] for r in records]
    assert eps[0] < eps[1] < eps[2]
    for partition in range(4):  # every round's steps are in every client's ledger (none lost to a stale copy)
        ledger = PrivacyLedger(out / "clients" / str(partition) / "privacy-ledger.json")
        assert sum(steps for _, _, steps in ledger.history) == 3 * 2
    assert (out / "epsilon.png").exists()


@pytest.mark.slow
def test_compare_runs_each_job_and_writes_one_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    model = make_tiny_bert(tmp_path / "tiny-bert")
    a = tiny_job(tmp_path, model, clients=4, per_round=2, rounds=1, max_train_examples=200, name="small_lr")
    b = tiny_job(tmp_path, model, clients=4, per_round=2, rounds=1, max_train_examples=200, name="big_lr")
    b.write_text(b.read_text().replace("lr = 1e-3", "lr = 5e-2"))
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--output-dir", str(out), "--no-progress"]) == 0
    specs = json.loads((out / "plots.json").read_text())
    assert set(specs[0]["series"]) == {"small_lr", "big_lr"} and specs[0]["xlabel"] == "round"
    for name in ("small_lr", "big_lr"):
        assert (out / name / "final" / "config.json").exists() and (out / name / "report.md").exists()
    assert "small_lr vs big_lr" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "small_lr" in printed and "big_lr" in printed and "val_accuracy" in printed


def test_a_client_reply_does_not_depend_on_what_its_actor_did_before(tmp_path: Path) -> None:
    """Dropout draws from torch's global RNG; an actor's RNG state depends on the clients it served
    before. The client runtime seeds it per training call from (job seed, round, client data), so a
    simulation of a model with dropout is reproducible whatever the actor did before."""
    from flwr.app import Context, RecordDict

    from coordinator.job import prepare_job
    from simulations.flower_app import handle_message
    from simulations.runner import apply_overrides, partition_table

    model = make_tiny_bert(tmp_path / "tiny-bert-dropout", dropout=0.3)
    job = tiny_job(tmp_path, model, clients=2, per_round=2, rounds=1, max_train_examples=200)
    config = apply_overrides(load_job(job), SimulationOptions())
    prepared = prepare_job(config, tmp_path / "out")
    (tmp_path / "out" / "partitions.json").write_text(json.dumps(partition_table(config)))
    settings = _settings(tmp_path / "out", threads=torch.get_num_threads())
    message = prepared.engine.train_message(1, 2)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})

    def via_client_app(history_seed: int) -> Message:
        torch.manual_seed(history_seed)  # a different past in the actor
        torch.rand(history_seed % 7 + 1)
        return handle_message(settings, message, context)

    def bare(history_seed: int) -> Message:
        torch.manual_seed(history_seed)
        return client_runtime(settings, 1).handle(message)

    _STATE.clear()
    try:
        a, b = via_client_app(1), via_client_app(2)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        # the runtime itself seeds dropout per (job, round, client data), so calling it bare is
        # reproducible too, and gives what the ClientApp gives
        c, d = bare(1), bare(2)
        assert all(torch.equal(c.tensors[k], d.tensors[k]) for k in c.tensors)
        assert all(torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)
    finally:
        _STATE.clear()


def test_offsite_mode_simulates_and_exports_the_full_model_with_the_adapter_plugged_in(tmp_path: Path) -> None:
    """The simulation runs offsite jobs with the same engine: actors train the adapter on the
    emulator, and final/ is the full 4-block model whose middle blocks are the original ones."""
    from transformers import AutoModelForSequenceClassification

    from emulator.layout import EmulatorLayout

    model = make_tiny_bert(tmp_path / "tiny-bert", layers=4)
    job = tiny_job(tmp_path, model, clients=4, per_round=2, rounds=2, max_train_examples=200, name="offsite")
    job.write_text(job.read_text().replace("[job]\n", '[job]\nmode = "offsite"\n') + """
[offsite]
adapter_layers = 1
keep = 1
""")
    out = tmp_path / "run"
    run_job(load_job(job), out, SimulationOptions(progress=False, object_store_mb=100))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [(r["status"], r["completed_clients"]) for r in records] == [("ok", 2), ("ok", 2)], records

    layout = EmulatorLayout.load(out / "package" / "model")
    final = AutoModelForSequenceClassification.from_pretrained(out / "final")
    original = AutoModelForSequenceClassification.from_pretrained(model)
    assert final.config.num_hidden_layers == layout.num_full_blocks == 4
    assert layout.num_emulator_blocks == 3
    tuned, untouched = final.state_dict(), original.state_dict()
    for block in range(4):
        names = [n for n in untouched if n.startswith(f"bert.encoder.layer.{block}.")]
        same = all(torch.equal(tuned[n], untouched[n]) for n in names)
        assert same == (block not in layout.adapter_full_indices), block
    # a client's round message carries the adapter blocks and the head: a few percent of the model
    full_bytes = sum(t.numel() * 4 for t in untouched.values())
    assert all(r["bytes_down"] / r["sampled_clients"] < 0.05 * full_bytes for r in records)

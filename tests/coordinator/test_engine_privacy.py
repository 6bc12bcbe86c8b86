"""The round engine with its privacy stack, driven in-process through the wire codec.

A tiny BERT with the real tokenizer and real WordNet rows, so rounds take
seconds; the protocol code (SecAgg+, Opacus, accounting) is the real one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from client.runtime import ClientRuntime
from coordinator.config import parse_job
from coordinator.job import prepare_job
from localio.data import read_examples, write_jsonl
from protos.codec import Message
from simulations.harness.inprocess import InProcessDriver

REPO = Path(__file__).resolve().parents[2]
VALIDATION = REPO / "coordinator" / "examples" / "data" / "wordnet_supersense.validation.jsonl.gz"


def _job(model_dir: Path, tmp: Path, **privacy: Any) -> dict[str, Any]:
    rows = read_examples(VALIDATION, need_label=True)
    random.Random(0).shuffle(rows)
    write_jsonl(tmp / "val.jsonl", rows[:200])
    return {
        "job": {"name": "t", "rounds": 2, "clients_per_round": 5, "min_clients": 3, "seed": 0},
        "model": {"path": str(model_dir), "max_length": 32},
        "data": {"validation": str(tmp / "val.jsonl"), "validation_max_examples": 0},
        "train": {"local_steps": 3, "batch_size": 8, "lr": 1e-2},
        "lora": {"r": 4},
        "privacy": privacy,
    }


def _clients(package_dir: Path, tmp: Path, n: int = 5) -> dict[str, ClientRuntime]:
    rows = read_examples(VALIDATION, need_label=True)[2000:]
    return {f"c{i}": ClientRuntime.from_package(package_dir, rows[i * 40 : (i + 1) * 40 + 5 * i],
                                                state_dir=tmp / f"c{i}") for i in range(n)}


def _run(table: dict[str, Any], tmp: Path, drop: Any = None, record: bool = False) -> tuple[Any, Any, list]:
    job = prepare_job(parse_job(table, tmp), tmp / "out")
    driver = InProcessDriver(_clients(job.package.folder, tmp), drop=drop, record_replies=record)
    records = job.engine.run(driver)
    return job, driver, records


def test_secure_round_equals_plain_round_within_quantization_error(tiny_bert_dir: Path, tmp_path: Path) -> None:
    # one round: after that the two runs start round 2 from (slightly) different points
    plain_table, secure_table = _job(tiny_bert_dir, tmp_path / "a"), _job(tiny_bert_dir, tmp_path / "b")
    plain_table["job"]["rounds"] = secure_table["job"]["rounds"] = 1
    secure_table["privacy"] = {"secure_aggregation": {"enabled": True}}
    plain, _, plain_records = _run(plain_table, tmp_path / "a")
    secure, _, secure_records = _run(secure_table, tmp_path / "b")
    assert secure_records[1]["completed_clients"] == 5 and secure_records[1]["status"] == "ok"
    bound = secure_records[1]["secagg_error_bound"]
    assert 0 < bound < 1e-4
    a, b = plain.model.trainable_state(), secure.model.trainable_state()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= bound + 1e-7, (worst, bound)
    assert any(float((a[k] - b[k]).abs().max()) > 0 for k in a)  # it really went through the quantizer
    assert plain_records[-1]["bytes_up"] > 0 and secure_records[-1]["bytes_up"] > 0


def test_secure_round_survives_a_dropout_at_the_masking_stage(tiny_bert_dir: Path, tmp_path: Path) -> None:
    def drop(client_id: str, message: Message) -> bool:
        return client_id == "c3" and message.config.get("secagg_stage") == "masked_input"

    _, _, records = _run(_job(tiny_bert_dir, tmp_path, secure_aggregation={"enabled": True}), tmp_path, drop=drop)
    for record in records[1:]:
        assert record["status"] == "ok" and record["completed_clients"] == 4 and record["dropped_clients"] == 1


def test_secure_rounds_after_the_first_skip_setup_and_a_restarted_client_rejoins(tiny_bert_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """Clients send their next round's SecAgg+ keys with their unmask replies, so later rounds have no setup
    exchange. A client that restarted (its keys gone) refuses round 2's keyed share_keys, counts as dropped
    there, and is set up afresh in round 3."""
    table = _job(tiny_bert_dir, tmp_path, secure_aggregation={"enabled": True})
    table["job"]["rounds"] = 3
    job = prepare_job(parse_job(table, tmp_path), tmp_path / "out")
    clients = _clients(job.package.folder, tmp_path)
    sent: dict[int, dict[str, list[str]]] = {}

    def spy(client_id: str, message: Message) -> bool:
        stage = str(message.config.get("secagg_stage"))
        sent.setdefault(message.round, {}).setdefault(stage, []).append(client_id)
        if message.round == 2 and stage == "share_keys" and client_id == "c2":  # c2 restarts just before
            old = clients["c2"]
            clients["c2"] = ClientRuntime(model=old.model, spec=old.spec, data=old.data, state_dir=old.state_dir)
        return False

    records = job.engine.run(InProcessDriver(clients, drop=spy))
    assert sorted(sent[1]) == ["masked_input", "setup", "share_keys", "unmask"] and len(sent[1]["setup"]) == 5
    assert "setup" not in sent[2] and len(sent[2]["share_keys"]) == 5
    assert records[2]["status"] == "ok" and records[2]["completed_clients"] == 4
    assert [r["secagg_keyed_clients"] for r in records[1:]] == [0, 5, 4]
    assert "keys this client made ahead" in records[2]["drop_reasons"]["c2"]
    assert sent[3]["setup"] == ["c2"] and records[3]["status"] == "ok" and records[3]["completed_clients"] == 5


def test_secure_round_below_threshold_fails_cleanly_and_the_job_goes_on(tiny_bert_dir: Path, tmp_path: Path) -> None:
    def drop(client_id: str, message: Message) -> bool:  # 3 of 5 vanish before unmasking in round 1
        return message.round == 1 and client_id in {"c0", "c1", "c2"} and message.config.get("secagg_stage") == "unmask"

    _, _, records = _run(_job(tiny_bert_dir, tmp_path, secure_aggregation={"enabled": True}), tmp_path, drop=drop)
    assert records[1]["status"] == "failed" and "aborted" in records[1]["failure"]
    assert records[2]["status"] == "ok" and records[2]["completed_clients"] == 5
    # the two that unmasked in the aborted round made keys for their next round, and round 2 used them
    assert records[2]["secagg_keyed_clients"] == 2


def test_local_dp_reports_epsilon_that_composes_and_the_budget_stops_clients(tiny_bert_dir: Path,
                                                                             tmp_path: Path) -> None:
    table = _job(tiny_bert_dir, tmp_path, local_dp={"enabled": True, "noise_multiplier": 1.0, "max_epsilon": 6.0})
    table["job"]["rounds"] = 4
    table["job"]["min_clients"] = 1
    table["train"]["local_steps"] = 4
    _, _, records = _run(table, tmp_path)
    eps = [r.get("epsilon_local_max") for r in records[1:]]
    assert eps[0] is not None and eps[1] > eps[0]
    # the budget of 6 cannot hold four rounds for the small clients: some decline, nothing breaks
    declined = [r for r in records[1:] if r.get("budget_exhausted_clients")]
    assert declined, eps
    assert all(max(r["epsilon_local"].values(), default=0.0) <= 6.0 for r in records[1:] if r.get("epsilon_local"))
    assert (tmp_path / "c0" / "privacy-ledger.json").exists()


@pytest.mark.parametrize("distributed", [False, True])
def test_client_dp_clips_every_update_and_accounts_the_job(tiny_bert_dir: Path, tmp_path: Path,
                                                           distributed: bool) -> None:
    table = _job(tiny_bert_dir, tmp_path, client_dp={"enabled": True, "clip_norm": 0.05, "noise_multiplier": 1.0,
                                                     "distributed": distributed})
    _, driver, records = _run(table, tmp_path, record=True)
    assert records[2]["epsilon_client"] > records[1]["epsilon_client"] > 0
    norms = [float(torch.sqrt(sum((t.double() ** 2).sum() for t in m.tensors.values())))
             for _, m in driver.replies_seen]
    reported = [m.config["update_norm"] for _, m in driver.replies_seen]
    assert max(reported) > 0.05  # training moved further than S: clipping had work to do
    if not distributed:  # without client-side noise the coordinator sees the clipped update itself
        assert max(norms) <= 0.05 * (1 + 1e-6)


def test_epsilon_local_max_never_decreases(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Different clients are sampled each round; the job's worst-case ε must still only grow."""
    table = _job(tiny_bert_dir, tmp_path, local_dp={"enabled": True, "noise_multiplier": 1.0, "max_epsilon": 50.0})
    table["job"].update({"rounds": 4, "clients_per_round": 2, "min_clients": 1})
    _, _, records = _run(table, tmp_path)
    maxima = [r["epsilon_local_max"] for r in records[1:]]
    assert maxima == sorted(maxima) and maxima[-1] >= max(records[-1]["epsilon_local"].values())


def _dp_accounting_epsilon(history: list[list[float]], delta: float) -> float:
    """ε of a ledger's history by Google's dp_accounting (RDP), independent of Opacus' accountant."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps)))
    return float(accountant.get_epsilon(delta))


def test_target_epsilon_is_reached_across_rounds_and_a_restart(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Each client calibrates σ to its own sampling rate so that the planned rounds x local steps land on
    the target; a restart (new processes reading the ledgers) keeps the plan; dp_accounting agrees."""
    import json

    table = _job(tiny_bert_dir, tmp_path, local_dp={"enabled": True, "target_epsilon": 3.0})
    table["job"].update({"rounds": 3, "min_clients": 5})
    table["train"].update({"local_steps": 2, "batch_size": 12, "physical_batch_size": 5})
    first = prepare_job(parse_job(table, tmp_path), tmp_path / "out")

    class Crash(Exception):
        pass

    def crash_in_round_3(client_id: str, message: Message) -> bool:
        if message.round == 3:
            raise Crash
        return False

    with pytest.raises(Crash):  # the coordinator dies as round 3 starts; every process starts again
        first.engine.run(InProcessDriver(_clients(first.package.folder, tmp_path), drop=crash_in_round_3))
    resumed = prepare_job(parse_job(table, tmp_path), tmp_path / "out", resume=True)
    assert resumed.engine.completed_rounds == 2
    records = resumed.engine.run(InProcessDriver(_clients(resumed.package.folder, tmp_path)))
    assert records[-1]["status"] == "ok" and records[-1]["completed_clients"] == 5
    sigmas = records[-1]["noise_multiplier_local"]
    assert len(set(sigmas.values())) > 1  # clients of different sizes calibrate differently
    for cid in sigmas:
        history = json.loads((tmp_path / cid / "privacy-ledger.json").read_text())["history"]
        assert sum(steps for _, _, steps in history) == 6
        reference = _dp_accounting_epsilon(history, 1e-5)
        assert 3.0 * 0.99 <= reference <= 3.0 * 1.01, (cid, reference, history)
        assert records[-1]["epsilon_local"][cid] == pytest.approx(reference, rel=1e-2)


def test_target_epsilon_clients_sampled_in_fewer_rounds_stay_under_it(tiny_bert_dir: Path, tmp_path: Path) -> None:
    table = _job(tiny_bert_dir, tmp_path, local_dp={"enabled": True, "target_epsilon": 3.0})
    table["job"].update({"rounds": 4, "clients_per_round": 2, "min_clients": 1})
    table["train"].update({"local_steps": 2, "batch_size": 12})
    _, _, records = _run(table, tmp_path)
    assert all(r["status"] == "ok" for r in records[1:])
    assert 0 < records[-1]["epsilon_local_max"] <= 3.0


def test_a_client_too_small_for_the_target_plan_declines_with_what_to_change(tiny_bert_dir: Path,
                                                                             tmp_path: Path) -> None:
    table = _job(tiny_bert_dir, tmp_path, local_dp={"enabled": True, "target_epsilon": 3.0})
    table["job"].update({"rounds": 1, "min_clients": 1})
    table["train"]["batch_size"] = 44  # c0 holds 40 examples, fewer than one logical batch
    _, _, records = _run(table, tmp_path)
    reason = records[1]["drop_reasons"]["c0"]
    assert "fewer than one logical batch" in reason and "lower batch_size" in reason
    assert records[1]["epsilon_local"]["c0"] == 0.0 and records[1]["completed_clients"] == 4  # it spent nothing


def test_a_dp_round_on_cached_states_leaves_no_opacus_hook_on_the_model(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Opacus wraps the model's top (the view over the cached frozen prefix), not the model: the round must
    unwrap what it wrapped, or the shared modules keep computing per-sample gradients afterwards."""
    table = _job(tiny_bert_dir, tmp_path, local_dp={"enabled": True, "noise_multiplier": 1.0})
    table["job"].update({"rounds": 1})
    table["lora"].update({"top_blocks": 1})
    job = prepare_job(parse_job(table, tmp_path), tmp_path / "out")
    clients = _clients(job.package.folder, tmp_path)
    records = job.engine.run(InProcessDriver(clients))
    assert records[-1]["status"] == "ok"
    for runtime in clients.values():
        assert runtime.examples.cache, "the round trained on cached states"
        trained = [(name, module) for name, module in runtime.model.named_modules()
                   if any(p.requires_grad for p in module.parameters(recurse=False))]  # what Opacus hooks
        assert trained
        hooked = [name for name, module in trained
                  if module._forward_hooks or module._backward_hooks or module._forward_pre_hooks]
        assert not hooked, hooked

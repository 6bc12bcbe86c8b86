"""fedsite-simulate's command line without starting Ray: the embedded default, canned configs, user errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coordinator.config import load_job
from simulations.cli import default_config_path, main
from simulations.runner import SimulationOptions, apply_overrides

CONFIGS = default_config_path().parent


def test_the_embedded_default_resolves_its_data_and_is_small() -> None:
    config = load_job(default_config_path())
    assert config.model.path == "minilm" and config.job.mode == "lora"
    assert config.simulation is not None and config.simulation.clients == 10
    assert config.simulation.partition == "dirichlet" and config.simulation.alpha == 0.5
    assert config.resolve(config.data.validation).is_file()
    assert config.resolve(config.simulation.train_data).is_file()
    assert config.simulation.max_train_examples and config.data.validation_max_examples


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_canned_config_loads_and_names_runnable_siblings(path: Path) -> None:
    config = load_job(path)
    assert config.job.name == path.stem
    assert config.resolve(config.simulation.train_data).is_file()  # type: ignore[union-attr]
    for sibling in re.findall(r"simulations/configs/(\S+\.toml)", path.read_text()):
        assert (CONFIGS / sibling).is_file(), sibling


def test_canned_groups_differ_only_in_what_they_compare() -> None:
    dp = {stem: load_job(CONFIGS / f"{stem}.toml") for stem in ("dp_off", "dp_eps8", "dp_eps2")}
    assert [c.privacy.local_dp.enabled for c in dp.values()] == [False, True, True]
    assert dp["dp_eps8"].privacy.local_dp.max_epsilon == 8 and dp["dp_eps2"].privacy.local_dp.max_epsilon == 2
    skew = [load_job(CONFIGS / f"{stem}.toml").simulation for stem in ("iid", "dirichlet_1.0", "dirichlet_0.5",
                                                                         "dirichlet_0.1")]
    assert [s.partition for s in skew] == ["iid", "dirichlet", "dirichlet", "dirichlet"]  # type: ignore[union-attr]
    assert [s.alpha for s in skew[1:]] == [1.0, 0.5, 0.1]  # type: ignore[union-attr]
    assert load_job(CONFIGS / "offsite.toml").job.mode == "offsite"
    assert load_job(CONFIGS / "secagg_on.toml").privacy.secure_aggregation.enabled


def test_overrides_clamp_sampling_to_the_clients_there_are() -> None:
    config = apply_overrides(load_job(default_config_path()), SimulationOptions(clients=2, rounds=1))
    assert config.simulation.clients == 2 and config.job.rounds == 1  # type: ignore[union-attr]
    assert config.job.clients_per_round == 2 and config.job.min_clients == 2


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedsite-simulate: error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_user_errors_end_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "cannot read job file" in _one_line_error(capsys, [str(tmp_path / "missing.toml")])
    no_sim = tmp_path / "no-sim.toml"
    no_sim.write_text('[job]\nname = "x"\n')
    assert "simulation.train_data is empty" in _one_line_error(capsys, [str(no_sim), "--output-dir",
                                                                         str(tmp_path / "o1")])
    assert "--clients must be >= 1" in _one_line_error(capsys, [str(default_config_path()), "--clients", "0",
                                                                 "--output-dir", str(tmp_path / "o2")])
    bad = tmp_path / "bad.toml"
    bad.write_text('[simulation]\npartition = "zipf"\n')
    assert "simulation.partition = 'zipf' is not one of" in _one_line_error(capsys, ["compare", str(bad)])


def test_a_dp_plan_some_client_cannot_carry_fails_before_training(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Too few examples per client for the target: one line naming the client and what to change, and no
    package built (the check runs before anything slow)."""
    job = tmp_path / "tiny.toml"
    data = default_config_path().parent.parent.parent / "coordinator" / "examples" / "data"
    job.write_text(f"""
[job]
name = "plan"
rounds = 10
[model]
max_length = 32
[data]
validation = "{data / 'wordnet_supersense.validation.jsonl.gz'}"
[train]
local_steps = 50
batch_size = 64
[privacy.local_dp]
enabled = true
target_epsilon = 1.0
[simulation]
clients = 10
partition = "iid"
train_data = "{data / 'wordnet_supersense.train.jsonl.gz'}"
max_train_examples = 2000
""")
    line = _one_line_error(capsys, [str(job), "--output-dir", str(tmp_path / "out")])
    assert "virtual client 0" in line and "needs noise multiplier" in line and "plan fewer steps" in line
    assert not (tmp_path / "out" / "package.tar").exists()

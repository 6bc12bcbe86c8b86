"""fedsite-simulate's command line without starting Ray: the embedded default, canned configs, user errors."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest

from coordinator.config import load_job
from simulations.cli import default_config_path, main
from simulations.runner import SimulationOptions, apply_overrides

CONFIGS = default_config_path().parent


def test_the_embedded_default_is_the_private_recipe_on_the_whole_split() -> None:
    config = load_job(default_config_path())
    assert config.model.path == "minilm" and config.job.mode == "lora" and config.model.pooling == "mean"
    assert config.simulation is not None and config.simulation.clients == 10
    assert config.simulation.partition == "dirichlet" and config.simulation.alpha == 0.5
    assert config.resolve(config.data.validation).is_file()
    assert config.resolve(config.simulation.train_data).is_file()
    assert config.simulation.max_train_examples == 0  # the whole shipped training split
    dp = config.privacy.local_dp
    assert dp.enabled and dp.target_epsilon is not None and dp.target_epsilon <= 8 and dp.delta <= 1e-5
    assert config.privacy.secure_aggregation.enabled
    assert config.train.batch_size >= 512 and config.train.cache_frozen_prefix


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_canned_config_loads_and_names_runnable_siblings(path: Path) -> None:
    config = load_job(path)
    assert config.job.name == path.stem
    assert config.resolve(config.simulation.train_data).is_file()  # type: ignore[union-attr]
    for sibling in re.findall(r"simulations/configs/(\S+\.toml)", path.read_text()):
        assert (CONFIGS / sibling).is_file(), sibling


def _settings(stem: str) -> dict[str, object]:
    """A canned job's settings as plain data, without its name."""
    config = load_job(CONFIGS / f"{stem}.toml")
    config.job.name = "x"
    return asdict(config)


def _differences(a: dict[str, object], b: dict[str, object], prefix: str = "") -> set[str]:
    keys = set(a) | set(b)
    out: set[str] = set()
    for key in keys:
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out |= _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            out.add(f"{prefix}{key}")
    return out


def test_canned_groups_differ_from_the_default_only_in_what_they_compare() -> None:
    default = _settings("default")
    dp_keys = {"privacy.local_dp.target_epsilon"}
    expected = {
        "dp_off": {"privacy.local_dp.enabled", "privacy.local_dp.target_epsilon"}, "dp_eps8": set(),
        "dp_eps4": dp_keys, "dp_eps2": dp_keys, "dp_eps1": dp_keys,
        "secagg_on": set(), "secagg_off": {"privacy.secure_aggregation.enabled"},
        "iid": {"simulation.partition"}, "dirichlet_1.0": {"simulation.alpha"},
        "dirichlet_0.5": set(), "dirichlet_0.1": {"simulation.alpha"},
    }
    for stem, keys in expected.items():
        assert _differences(default, _settings(stem)) == keys, stem
    targets = [load_job(CONFIGS / f"dp_eps{e}.toml").privacy.local_dp.target_epsilon for e in (8, 4, 2, 1)]
    assert targets == [8, 4, 2, 1] and not load_job(CONFIGS / "dp_off.toml").privacy.local_dp.enabled
    assert load_job(CONFIGS / "offsite.toml").job.mode == "offsite"


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

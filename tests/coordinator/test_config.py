"""Job files: the full example (every table of the job-file contract) loads; every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import ConfigError, load_job, parse_job

REPO = Path(__file__).resolve().parents[2]
DESIGN_EXAMPLE = """
[job]
name = "wordnet-lora"
mode = "lora"
rounds = 5
clients_per_round = 3
min_clients = 2
round_timeout_s = 600
seed = 0
[model]
path = "minilm"
task = "classification"
max_length = 64
[data]
validation = "data/wordnet_supersense.validation.jsonl.gz"
[train]
local_steps = 30
batch_size = 16
lr = 5e-4
[server]
optimizer = "fedavg"
[lora]
r = 8
alpha = 16
freeze_a = false
[offsite]
adapter_layers = 2
keep_ratio = 0.5
distill_data = ""
distill_steps = 0
[privacy.local_dp]
enabled = false
noise_multiplier = 1.0
max_grad_norm = 1.0
delta = 1e-5
max_epsilon = 8.0
accountant = "rdp"
[privacy.client_dp]
enabled = false
clip_norm = 1.0
noise_multiplier = 1.0
delta = 1e-5
distributed = true
[privacy.secure_aggregation]
enabled = false
threshold = 0.66
[enrollment]
tokens_file = "tokens.txt"
[tls]
cert = ""
key = ""
client_ca = ""
"""


def test_the_design_cards_job_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(DESIGN_EXAMPLE)
    config = load_job(path)
    assert config.job.name == "wordnet-lora" and config.lora.r == 8 and config.offsite.adapter_layers == 2
    assert config.privacy.secure_aggregation.threshold == 0.66
    assert config.resolve(config.data.validation) == tmp_path / "data" / "wordnet_supersense.validation.jsonl.gz"


def test_shipped_examples_load() -> None:
    for path in (REPO / "coordinator" / "examples").glob("*.toml"):
        config = load_job(path)
        assert config.resolve(config.data.validation).exists(), path
        assert config.resolve(config.enrollment.tokens_file).exists(), path


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"job": {"mode": "central"}}, r"job.mode = 'central' is not one of: lora, offsite"),
        ({"job": {"rounds": 0}}, r"job.rounds must be a positive number"),
        ({"job": {"rounds": "5"}}, r"job.rounds must be an integer"),
        ({"job": {"min_clients": 4, "clients_per_round": 3}}, r"job.min_clients \(4\) must be <="),
        ({"job": {"heartbeat_timeout_s": 2}}, r"job.heartbeat_timeout_s must be >= 3"),
        ({"job": {"roundz": 3}}, r"unknown key 'roundz' in \[job\]; allowed: .*rounds"),
        ({"model": {"task": "qa"}}, r"model.task = 'qa' is not one of: classification, causal-lm"),
        ({"train": {"lr": -1.0}}, r"train.lr must be a positive number"),
        ({"server": {"optimizer": "sgd"}}, r"server.optimizer = 'sgd' is not one of: fedavg, fedadam"),
        ({"lora": {"freeze_a": "yes"}}, r"lora.freeze_a must be true or false"),
        ({"privacy": {"local_dp": {"accountant": "moments"}}}, r"privacy.local_dp.accountant = 'moments'"),
        ({"privacy": {"secure_aggregation": {"threshold": 0.2}}}, r"privacy.secure_aggregation.threshold"),
        ({"tls": {"cert": "a.pem"}}, r"tls.cert and tls.key must be given together"),
        ({"offsite": {"refine_steps": 100}}, r"offsite.refine_steps > 0 needs offsite.distill_data"),
        ({"offsite": {"refine_steps": 10, "distill_data": "p.txt", "refine_lr": 0.0}},
         r"offsite.refine_lr must be a positive number"),
        ({"offsite": {"refine_text": "news"}}, r"offsite.refine_text must be one of public, generated"),
        ({"offsite": {"refine_emulator_weight": 0.0}}, r"offsite.refine_emulator_weight must be in \(0, 1\]"),
        ({"offsite": {"refine_generated_texts": 0}}, r"offsite.refine_generated_texts must be a positive"),
        ({"offsite": {"refine_keep": "refined"}}, r"offsite.refine_keep must be one of better, always"),
        ({"offsite": {"refine_steps": 10, "refine_text": "generated"}},
         r"offsite.refine_text = \"generated\" needs model.task = \"causal-lm\""),
        ({"privacy": {"local_dp": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 8.0}}},
         r"privacy.local_dp: give noise_multiplier or target_epsilon, not both"),
        ({"privacy": {"local_dp": {"enabled": True}}},
         r"privacy.local_dp: give noise_multiplier \(fixed noise\) or target_epsilon"),
        ({"privacy": {"local_dp": {"enabled": True, "target_epsilon": 9.0, "max_epsilon": 8.0}}},
         r"target_epsilon \(9.0\) must be <= max_epsilon"),
        ({"privacy": {"local_dp": {"enabled": True, "target_epsilon": 2.0, "accountant": "gdp"}}},
         r"target_epsilon needs accountant"),
        ({"train": {"physical_batch_size": 0}}, r"train.physical_batch_size must be a positive number"),
        ({"privacy": {"local_dp": {"head_clip_fraction": 1.0}}}, r"privacy.local_dp.head_clip_fraction must be in"),
        ({"model": {"pooling": "max"}}, r"model.pooling = 'max' is not one of: cls, mean"),
        ({"model": {"pooling": "mean"}, "job": {"mode": "offsite"}}, r"model.pooling = \"mean\" is for mode"),
        ({"jobs": {}}, r"unknown key 'jobs' in the job file"),
        ({"job": 3}, r"\[job\] must be a table"),
    ],
)
def test_mistakes_name_the_key(table: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_job(table, Path("."))


def test_unreadable_and_invalid_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[job\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(bad)


def _float_keys() -> list[str]:
    """Every float key of the job file, found from the dataclasses (so a new key is covered the day it lands)."""
    import dataclasses
    import typing

    from coordinator.config import JobConfig, SimulationSection

    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if dataclasses.is_dataclass(inner[0]):
                walk(inner[0], f"{prefix}{f.name}.")  # type: ignore[arg-type]
            elif inner[0] is float:
                keys.append(prefix + f.name)

    walk(JobConfig, "")
    walk(SimulationSection, "simulation.")
    return keys


def test_every_float_key_refuses_nan_and_infinity_in_one_line(tmp_path: Path) -> None:
    keys = _float_keys()
    assert {"job.heartbeat_timeout_s", "job.wait_for_clients_s", "job.sample_grace_s", "train.weight_decay",
            "train.head_lr", "server.eps", "privacy.client_dp.noise_multiplier"} <= set(keys)
    for key in keys:
        table, name = key.rsplit(".", 1)
        for value in ("nan", "inf", "-inf"):
            path = tmp_path / "job.toml"
            path.write_text(f"[{table}]\n{name} = {value}\n")
            with pytest.raises(ConfigError) as info:
                load_job(path)
            message = str(info.value)
            assert key in message and "\n" not in message, (key, value, message)


@pytest.mark.parametrize("table", [
    {"job": {"wait_for_clients_s": -1}}, {"job": {"sample_grace_s": -0.5}}, {"train": {"weight_decay": -1e-3}},
    {"server": {"eps": 0}}, {"server": {"max_update_norm": -1}}, {"server": {"examples_cap": 0}},
    {"privacy": {"secure_aggregation": {"clipping_range": -1}}},
])
def test_negative_times_and_bounds_are_refused(table: dict) -> None:
    with pytest.raises(ConfigError):
        parse_job(table, Path("."))

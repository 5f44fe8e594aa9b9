import math

import pytest

from fedalign_dist.config import ConfigError, dump_config, load_config

DEMO = "configs/demo.yaml"


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = load_config(DEMO)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_dotted_overrides_are_typed():
    cfg = load_config(DEMO, ["fed.rounds=3", "local.lr=5e-4", "model.finetune=lora", "model.freeze=[embed]"])
    assert cfg.fed.rounds == 3 and math.isclose(cfg.local.lr, 5e-4)
    assert cfg.model.finetune == "lora" and cfg.model.freeze == ["embed"]


@pytest.mark.parametrize("override, suggestion", [
    ("fed.round=3", "fed.rounds"),
    ("local.batchsize=4", "local.batch_size"),
    ("modle.family=mixtral", "model"),
])
def test_unknown_key_names_the_closest(override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}"):
        load_config(DEMO, [override])


def test_unknown_strategy_suggests():
    with pytest.raises(ConfigError, match="did you mean 'fedavg'"):
        load_config(DEMO, ["strategy.name=fedavgg"])


@pytest.mark.parametrize("override, words", [
    ("fed.clients_per_round=100", "exceeds fed.num_clients"),
    ("local.lr=-1", "local.lr"),
    ("data.partition=natural", "natural"),
    ("model.top_k=9", "model.top_k"),
    ("model.finetune=half", "model.finetune"),
    ("fed.rounds=many", "fed.rounds"),
    ("deepspeed.zero_stage=3", "zero_stage=3 is not supported"),
])
def test_bad_values_fail_with_the_key(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(DEMO, [override])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DEMO, ["fed.rounds"])


def test_fedalign_knobs_are_validated():
    cfg = load_config(
        "configs/demo.yaml",
        ["strategy.fedalign.beta=inf", "strategy.fedalign.consistency_temperature=inf", "strategy.fedalign.mu=0"],
    )
    assert math.isinf(cfg.strategy.fedalign.beta) and cfg.strategy.fedalign.mu == 0
    with pytest.raises(ConfigError, match="comm=allgather"):
        load_config("configs/demo.yaml", ["strategy.fedalign.mode=pairwise"])
    with pytest.raises(ConfigError, match="did you mean 'strategy.fedalign.signature'"):
        load_config("configs/demo.yaml", ["strategy.fedalign.signatur=probe"])
    with pytest.raises(ConfigError, match="signature"):
        load_config("configs/demo.yaml", ["strategy.fedalign.signature=weights"])
    with pytest.raises(ConfigError, match="mu"):
        load_config("configs/demo.yaml", ["strategy.fedalign.mu=-1"])


def test_optimizer_state_is_never_shared_between_clients():
    with pytest.raises(ConfigError, match="local.reset_optimizer=false is not supported"):
        load_config(None, ["local.reset_optimizer=false"])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\nfed:\n  rounds: [3\n  num_clients: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+, column \d+: YAML syntax error"):
        load_config(bad)

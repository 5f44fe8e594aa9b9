"""With model.path the checkpoint says what the model is: family, experts and top-k are read
from its config.json (and saved so), contradictions and impossible pairings are refused with
messages that say what to change."""
import pytest

from fedalign_dist.config import ConfigError, load_config
from fedalign_dist.data.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from fedalign_dist.models.build import build_base_model, dense_base
    root = tmp_path_factory.mktemp("ckpts")
    cfg = load_config(None, ["model.family=qwen3_moe", "model.num_experts=6", "model.top_k=3",
                             "data.tokenizer=byte", "data.max_length=32"])
    build_base_model(cfg.model, ByteTokenizer(), 32, 0)[0].save_pretrained(root / "qwen3")
    dense = load_config(None, ["model.family=llama", "strategy.name=fedamole", "data.tokenizer=byte",
                               "data.max_length=32"])
    dense_base(dense, ByteTokenizer()).save_pretrained(root / "dense")
    return root


def test_family_experts_and_top_k_come_from_the_checkpoint(checkpoints):
    cfg = load_config(None, [f"model.path={checkpoints / 'qwen3'}", "data.tokenizer=byte"])
    assert (cfg.model.family, cfg.model.num_experts, cfg.model.top_k, cfg.model.preset) == ("qwen3_moe", 6, 3, None)


def test_a_contradicting_family_names_both(checkpoints):
    with pytest.raises(ConfigError, match=r"model.family=gpt_oss contradicts the checkpoint at model.path "
                                          r"\(qwen3_moe in its config.json\)"):
        load_config(None, [f"model.path={checkpoints / 'qwen3'}", "model.family=gpt_oss"])
    with pytest.raises(ConfigError, match=r"model.num_experts=4 contradicts"):
        load_config("configs/demo.yaml", [f"model.path={checkpoints / 'qwen3'}", "model.family=qwen3_moe"])


def test_dense_checkpoint_with_an_moe_strategy_is_refused(checkpoints):
    with pytest.raises(ConfigError, match=r"is a dense \(llama\) checkpoint; strategy fedalign needs a "
                                          r"Mixture-of-Experts model"):
        load_config(None, [f"model.path={checkpoints / 'dense'}", "strategy.name=fedalign", "data.tokenizer=byte"])
    assert load_config(None, [f"model.path={checkpoints / 'dense'}", "strategy.name=fedamole",
                              "data.tokenizer=byte"]).model.family == "llama"


def test_tokenizer_from_a_checkpoint_without_one_is_refused(checkpoints):
    with pytest.raises(ConfigError, match="data.tokenizer=model but model.path .* holds no tokenizer"):
        load_config(None, [f"model.path={checkpoints / 'qwen3'}", "data.tokenizer=model"])


def test_the_router_loss_weight_is_the_checkpoints_unless_set(checkpoints):
    """model.router_aux_loss_coef is a training choice: it applies to a checkpoint too (it was
    silently the checkpoint's own, so a grouped run asked to turn it off kept it), and unset it
    leaves the checkpoint's value (a preset's is 0.01)."""
    import json

    from fedalign_dist.models.build import build_base_model
    path = checkpoints / "qwen3"
    saved = json.loads((path / "config.json").read_text())["router_aux_loss_coef"]
    weight = lambda overrides: build_base_model(  # noqa: E731
        load_config(None, [f"model.path={path}", "data.tokenizer=byte", *overrides]).model,
        ByteTokenizer(), 32, 0)[0].config.router_aux_loss_coef
    assert weight([]) == saved
    assert weight(["model.router_aux_loss_coef=0"]) == 0.0
    assert weight(["model.router_aux_loss_coef=0.25"]) == 0.25
    preset = load_config(None, ["data.tokenizer=byte", "data.max_length=32"])
    assert build_base_model(preset.model, ByteTokenizer(), 32, 0)[0].config.router_aux_loss_coef == 0.01

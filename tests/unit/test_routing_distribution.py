"""Item: each family's statistics describe the distribution its router really routes with.
The project's p(x) must rank experts exactly as the model chose them (top-k agree), on
every family, and on DeepSeek-V3 with grouped routing and a correction bias that changes
the choice (where softmax of the logits ranks them differently)."""
import pytest
import torch
import transformers as tf

from fedalign_dist.aggregation.alignment import kl_divergence
from fedalign_dist.clients.routing_stats import StatsRequest, routing_statistics
from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.models.build import build_model
from fedalign_dist.models.families import FAMILIES, family_of
from fedalign_dist.models.router_tap import RouterTap
from fedalign_dist.models.routing import sigmoid_grouped_distribution

CPU = torch.device("cpu")


def _ids(seed=0, batch=3, width=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, width), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(width).expand(batch, width).contiguous()}


def _topk_agreement(model, family, k):
    """Fraction of (token, layer) whose top-k of the project's distribution is the model's set."""
    batch = _ids()
    agree, total = 0, 0
    with RouterTap(model, family) as tap, torch.no_grad():
        model(**batch)
        for layer in tap.layers:
            probs = tap.routing_probs(layer)
            ours = probs.topk(k, dim=-1).indices.sort(-1).values
            theirs = tap.records[layer].indices.sort(-1).values
            agree += int((ours == theirs).all(-1).sum())
            total += ours.shape[0]
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))
    return agree / total


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_topk_of_the_distribution_is_the_models_choice(family, finetune):
    cfg = load_config(None, [f"model.family={family}", f"model.finetune={finetune}", "model.num_experts=8",
                             "model.top_k=2", "data.max_length=32"])
    model, anatomy = build_model(cfg, ByteTokenizer())
    with torch.no_grad():  # spread the router so the choice is not a tie of near-zero logits
        for name, p in model.named_parameters():
            if anatomy.role(name).kind == "router":
                p.normal_(0, 0.5)
    assert _topk_agreement(model, anatomy.family, 2) == 1.0


def _deepseek(seed=0):
    """A grouped DeepSeek-V3 (8 experts in 4 groups, 2 groups kept, top-2) whose correction
    bias favours experts the logits alone would not pick."""
    torch.manual_seed(seed)
    config = tf.DeepseekV3Config(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                 n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                 n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=32,
                                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.3)
            layer.mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.6, -0.3, 0.0, 0.4, -0.2, 0.1, 0.5, -0.5]))
    return model


def test_deepseek_grouped_biased_routing_is_described_exactly():
    model = _deepseek()
    family = family_of("deepseek_v3")
    assert _topk_agreement(model, family, 2) == 1.0
    # the old statistic (softmax of the logits) picks other experts on most tokens
    batch = _ids()
    with RouterTap(model, family) as tap, torch.no_grad():
        model(**batch)
        rec = tap.records[tap.layers[0]]
        softmax_choice = torch.softmax(rec.logits.float(), -1).topk(2, dim=-1).indices.sort(-1).values
        disagree = (softmax_choice != rec.indices.sort(-1).values).any(-1).float().mean()
    assert disagree > 0.3, float(disagree)
    # experts outside the kept groups get no mass; usage follows the biased choice
    with RouterTap(model, family) as tap, torch.no_grad():
        model(**batch)
        probs = tap.routing_probs(tap.layers[0])
    assert (probs < 1e-9).sum(-1).min() >= 4  # 2 of 4 groups (of 2 experts) dropped per token
    stats = routing_statistics(model, family, 8, [batch], StatsRequest(1), CPU)
    assert torch.corrcoef(torch.stack([stats["usage"][0], stats["load"][0]]))[0, 1] > 0.8


def test_sigmoid_grouped_distribution_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    bias = torch.tensor([0.5, 0.0, 0.0, -0.2])
    # choice = sigmoid + bias = [1.0, 0.8808, 0.2689, 0.5311]; groups {0,1}: 1.8808, {2,3}: 0.8; keep 1
    p = sigmoid_grouped_distribution(logits, bias, num_groups=2, groups_kept=1)
    expected = torch.tensor([[1.0, 0.880797, 0.0, 0.0]])
    torch.testing.assert_close(p, expected / expected.sum(), rtol=1e-5, atol=1e-9)
    # every eligible score negative: still a distribution over the eligible experts
    p = sigmoid_grouped_distribution(torch.tensor([[-9.0, -9.0]]), torch.tensor([-1.0, -1.0]), 1, 1)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.5]]))


def test_regulariser_gradient_reaches_the_deepseek_router():
    """The KL term is differentiable through the sigmoid scores (the bias is a buffer)."""
    cfg = load_config(None, ["model.family=deepseek_v3", "model.num_experts=4", "model.top_k=2",
                             "data.max_length=32"])
    model, anatomy = build_model(cfg, ByteTokenizer())
    with RouterTap(model, anatomy.family) as tap:
        model(**_ids())
        probs = tap.router_probs(_ids()["attention_mask"])
        prior = torch.tensor([0.7, 0.1, 0.1, 0.1])
        kl = sum(kl_divergence(p.mean(0), prior) for p in probs)
        kl.backward()
    grads = [p.grad for n, p in model.named_parameters() if anatomy.role(n).kind == "router"]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

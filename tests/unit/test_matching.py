"""Alignment by matching: renumbering a client's experts together with everything that belongs
to them (router rows and bias, fused expert tensors, per-expert LoRA) leaves its model's
function unchanged, in every family with a router; the matching finds a permutation hidden
under noise, keeps the numbering on ties, and respects routing groups."""
import pytest
import torch
import transformers as tf

from fedalign_dist.aggregation.matching import (
    aligned_delta,
    check_permutable,
    inverse,
    match_to_centroid,
    match_to_reference,
    matching_permutation,
    permute_experts,
)
from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.models.anatomy import MoEAnatomy, routing_groups
from fedalign_dist.models.build import build_model
from fedalign_dist.models.families import FAMILIES

IDS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
LARGEST: dict[str, float] = {}  # family/finetune -> largest logit difference, printed with -s


def _model(family: str, finetune: str):
    cfg = load_config(None, [f"model.family={family}", f"model.finetune={finetune}", "model.num_experts=4",
                             "data.max_length=32"])
    model, anatomy = build_model(cfg, ByteTokenizer())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero, router biases too: give every factor a value
        for name, p in model.named_parameters():
            if anatomy.role(name).kind in ("expert_lora_B", "router") or name.endswith("_bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval(), anatomy


def _logits(model, state=None):
    if state is not None:
        model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_renumbering_experts_with_their_tensors_keeps_the_function(family, finetune):
    model, anatomy = _model(family, finetune)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if anatomy.is_per_expert(n)}
    before = _logits(model)
    perms = {layer: torch.randperm(4, generator=torch.Generator().manual_seed(layer + 7)) for layer in anatomy.layers()}
    assert all(not torch.equal(p, torch.arange(4)) for p in perms.values())
    moved = permute_experts(state, anatomy, perms)
    assert any(not torch.equal(moved[n], state[n]) for n in state)
    after = _logits(model, moved)
    LARGEST[f"{family}/{finetune}"] = float((after - before).abs().max())
    print(f"\n{family}/{finetune}: largest logit difference after renumbering {LARGEST[f'{family}/{finetune}']:.1e}")
    assert LARGEST[f"{family}/{finetune}"] <= 1e-6, LARGEST
    # back to the client's own numbering: bit for bit
    back = permute_experts(moved, anatomy, {layer: inverse(p) for layer, p in perms.items()})
    assert all(torch.equal(back[n], state[n]) for n in state)
    # the experts moved without their router rows: another function (the test can fail)
    rows_kept = {n: (state[n] if anatomy.role(n).kind == "router" else t) for n, t in moved.items()}
    assert (_logits(model, rows_kept) - before).abs().max() > 1e-4


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_renumbered_client_brings_its_parameters_not_its_changes(family, finetune):
    """A client whose trained model is a renumbered copy P(T) of T (delta = P(T) - start):
    renumbered back, global expert e receives T[e] - start[e] in every per-expert tensor
    (router rows and biases, fused expert tensors, LoRA A and B), not the change P(T)[e] -
    start[p(e)] moved; with the identity the delta is left as it is."""
    model, anatomy = _model(family, finetune)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(3)
    trained = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in start.items()}
    perms = {layer: torch.randperm(4, generator=torch.Generator().manual_seed(layer + 7)) for layer in anatomy.layers()}
    client = permute_experts(trained, anatomy, perms)
    delta = {n: client[n] - start[n] for n in start}
    back = {layer: inverse(p) for layer, p in perms.items()}  # what a matching finds
    aligned = aligned_delta(delta, start, anatomy, back)
    per_expert = [n for n in start if anatomy.is_per_expert(n)]
    assert per_expert and any(anatomy.role(n).kind in ("expert_lora_A", "expert_lora_B") for n in per_expert) == (
        finetune == "lora")
    for name in start:
        if name in per_expert:
            torch.testing.assert_close(aligned[name], trained[name] - start[name], rtol=0, atol=1e-6)
        else:
            assert aligned[name] is delta[name]
    moved_changes = permute_experts(delta, anatomy, back)  # the old way: far off where experts differ
    assert max(float((moved_changes[n] - (trained[n] - start[n])).abs().max()) for n in per_expert) > 1e-2
    identity = {layer: torch.arange(4) for layer in anatomy.layers()}
    assert aligned_delta(delta, start, anatomy, identity) is delta


def test_match_to_reference_matches_each_client_to_the_global_experts():
    """Against the global model's signatures one client is enough, and a permuted client is
    found even when it is half of the federation (a centroid of two numberings finds neither)."""
    roles, sig = _federation(num_clients=2)
    hidden = torch.tensor([3, 1, 2, 0, 4, 5, 7, 6])
    sig[1, 0] = sig[1, 0, hidden]
    active = torch.ones(2, 1, 8, dtype=torch.bool)
    perms = match_to_reference(sig, active, roles[None], margin=0.1)
    assert torch.equal(hidden[perms[1, 0]], torch.arange(8)) and torch.equal(perms[0, 0], torch.arange(8))
    assert torch.equal(match_to_centroid(sig, active, torch.ones(2, 1, 8), margin=0.1)[1, 0], torch.arange(8))
    # a zero reference (none computed) keeps the numbering; groups are respected
    keep = torch.arange(8).expand(2, 1, 8)
    assert torch.equal(match_to_reference(sig, active, torch.zeros_like(sig), margin=0.1), keep)
    grouped = match_to_reference(sig, active, roles[None], margin=0.1, groups=2)
    assert torch.equal(grouped[1, 0], hidden)  # hidden moves within groups {0..3} and {4..7} only
    sig[1, 0] = sig[1, 0, hidden]  # back to the global numbering, then a swap across groups {0..3} and {4..7}
    sig[1, 0] = sig[1, 0, [4, 1, 2, 3, 0, 5, 6, 7]]
    assert torch.equal(match_to_reference(sig, active, roles[None], margin=0.1, groups=2)[1, 0], torch.arange(8))
    assert torch.equal(match_to_reference(sig, active, roles[None], margin=0.1)[1, 0],
                       torch.tensor([4, 1, 2, 3, 0, 5, 6, 7]))


def test_matching_recovers_a_hidden_permutation_and_keeps_ties():
    gen = torch.Generator().manual_seed(0)
    signatures = torch.randn(8, 16, generator=gen)
    hidden = torch.randperm(8, generator=gen)
    client = signatures[hidden] + 0.05 * torch.randn(8, 16, generator=gen)  # client expert j = global hidden[j]
    sim = torch.nn.functional.cosine_similarity(signatures[:, None], client[None], dim=-1)
    perm = matching_permutation(sim)
    assert torch.equal(hidden[perm], torch.arange(8))  # client expert perm[i] is global expert i
    assert torch.equal(matching_permutation(torch.ones(8, 8)), torch.arange(8))  # a tie keeps the numbering
    assert torch.equal(matching_permutation(torch.eye(8)), torch.arange(8))


def test_matching_moves_experts_only_within_routing_groups():
    sim = torch.zeros(4, 4)
    sim[0, 2] = sim[2, 0] = sim[1, 3] = sim[3, 1] = 1.0  # the best matching crosses groups {0,1} and {2,3}
    assert torch.equal(matching_permutation(sim), torch.tensor([2, 3, 0, 1]))
    assert torch.equal(matching_permutation(sim, groups=2), torch.arange(4))
    with pytest.raises(ValueError, match="do not split into 3"):
        matching_permutation(sim, groups=3)
    with pytest.raises(ValueError, match="non-finite"):
        matching_permutation(torch.full((4, 4), float("nan")))


def _federation(num_clients=6, experts=8, noise=0.05, seed=0):
    """(N, L=1, E, D) signatures of clients that agree on their experts' roles."""
    gen = torch.Generator().manual_seed(seed)
    roles = torch.randn(experts, 16, generator=gen)
    return roles, torch.stack([roles + noise * torch.randn(experts, 16, generator=gen)
                               for _ in range(num_clients)])[:, None]


def test_match_to_centroid_renumbers_only_the_permuted_client():
    _, sig = _federation()
    hidden = torch.tensor([3, 1, 2, 0, 4, 5, 7, 6])
    sig[4, 0] = sig[4, 0, hidden]  # client 4: its expert j plays global expert hidden[j]
    active, mass = torch.ones(6, 1, 8, dtype=torch.bool), torch.ones(6, 1, 8)
    perms = match_to_centroid(sig, active, mass, margin=0.1)
    assert torch.equal(hidden[perms[4, 0]], torch.arange(8))
    assert all(torch.equal(perms[i, 0], torch.arange(8)) for i in (0, 1, 2, 3, 5))
    # a client holding most of the mass pulls the first centroids to its numbering; recomputing
    # them after the first matching still finds the honest majority's numbering
    heavy = mass.clone()
    heavy[4] = 3.0
    assert torch.equal(hidden[match_to_centroid(sig, active, heavy, margin=0.1)[4, 0]], torch.arange(8))


def test_match_to_centroid_keeps_inactive_experts_noise_and_groups():
    _, sig = _federation(noise=0.6)  # noisy but agreeing clients: no gain above the margin
    active, mass = torch.ones(6, 1, 8, dtype=torch.bool), torch.ones(6, 1, 8)
    assert torch.equal(match_to_centroid(sig, active, mass, margin=1.0), torch.arange(8).expand(6, 1, 8))
    _, sig = _federation()
    sig[1, 0] = sig[1, 0, [1, 0, 2, 3, 4, 5, 6, 7]]
    inactive = active.clone()
    inactive[1, 0, 1] = False  # its expert 1 saw no token: it keeps its number, so 0 has no partner
    assert torch.equal(match_to_centroid(sig, inactive, mass, margin=0.1)[1, 0], torch.arange(8))
    sig[2, 0] = sig[2, 0, [2, 1, 0, 3, 4, 5, 6, 7]]  # a swap within routing group {0..3}
    sig[3, 0] = sig[3, 0, [4, 1, 2, 3, 0, 5, 6, 7]]  # across groups: refused when the router picks groups
    perms = match_to_centroid(sig, active, mass, margin=0.1, groups=2)
    assert torch.equal(perms[2, 0], torch.tensor([2, 1, 0, 3, 4, 5, 6, 7]))
    assert torch.equal(perms[3, 0], torch.arange(8))
    assert torch.equal(match_to_centroid(sig, active, mass, margin=0.1)[3, 0], torch.tensor([4, 1, 2, 3, 0, 5, 6, 7]))


def _grouped_deepseek():
    config = tf.DeepseekV3Config(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                 n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                 n_group=4, topk_group=1, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8,
                                 qk_nope_head_dim=8, v_head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # routing that differs between experts (the default init is near uniform)
        model.model.layers[0].mlp.gate.weight.normal_(0, 0.3)
    return model, MoEAnatomy(model, FAMILIES["deepseek_v3"], 8)


def test_grouped_routing_keeps_its_function_only_for_moves_within_groups():
    model, anatomy = _grouped_deepseek()
    assert routing_groups(model.config) == 4
    state = {n: p.detach().clone() for n, p in model.named_parameters() if anatomy.is_per_expert(n)}
    before = _logits(model)
    within = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    assert (_logits(model, permute_experts(state, anatomy, {0: within})) - before).abs().max() <= 1e-6
    whole_groups = torch.tensor([2, 3, 0, 1, 6, 7, 4, 5])  # groups renumbered as wholes: the same choices
    assert (_logits(model, permute_experts(state, anatomy, {0: whole_groups})) - before).abs().max() <= 1e-6
    across = torch.tensor([0, 2, 1, 3, 4, 5, 6, 7])  # experts 1 and 2 change groups: other choices
    assert (_logits(model, permute_experts(state, anatomy, {0: across})) - before).abs().max() > 1e-4


def test_a_routing_correction_outside_the_federated_state_is_refused_unless_uniform():
    model, _ = _grouped_deepseek()
    check_permutable(model)  # zeros, as at initialisation
    bias = next(b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    bias[3] = 0.5
    with pytest.raises(ValueError, match="e_score_correction_bias: the routing correction differs"):
        check_permutable(model)


def test_not_a_permutation_is_refused():
    model, anatomy = _model("mixtral", "full")
    state = {n: p.detach().clone() for n, p in model.named_parameters() if anatomy.is_per_expert(n)}
    with pytest.raises(ValueError, match="is not a permutation"):
        permute_experts(state, anatomy, {0: torch.tensor([0, 0, 1, 2])})


def test_a_matching_gain_by_noise_is_not_taken_for_renumbering():
    """Experts that local training rewrote: every similarity near zero, so a matching gains over
    the numbering by noise alone (more than the margin), which the permutation test sees; the
    same client with recognisable, renumbered experts is renumbered."""
    from fedalign_dist.aggregation.matching import chance_of_gain
    gen = torch.Generator().manual_seed(3)
    ref = torch.nn.functional.normalize(torch.randn(1, 1, 8, 16, generator=gen), dim=-1)
    rewritten = torch.randn(1, 1, 8, 16, generator=gen)  # unrelated to the experts they started as
    active = torch.ones(1, 1, 8, dtype=torch.bool)
    assert not torch.equal(match_to_reference(rewritten, active, ref, margin=0.1, alpha=1.0)[0, 0], torch.arange(8))
    assert torch.equal(match_to_reference(rewritten, active, ref, margin=0.1)[0, 0], torch.arange(8))
    hidden = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    recognisable = ref[:, :, hidden] + 0.3 * torch.randn(1, 1, 8, 16, generator=gen)
    assert torch.equal(hidden[match_to_reference(recognisable, active, ref, margin=0.1)[0, 0]], torch.arange(8))
    sim = ref[0, 0] @ torch.nn.functional.normalize(recognisable[0, 0], dim=-1).T
    allowed = torch.ones(8, 8, dtype=torch.bool)
    assert chance_of_gain(sim, allowed, float(sim[torch.arange(8), hidden].sum())) == 1 / 201  # no deal does as well

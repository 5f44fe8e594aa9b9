"""The premise diagnostic's mathematics: agreeing clients, a client whose experts are
renumbered, and diverging routing are told apart."""
import torch

from fedalign_dist.diagnose.premise import premise, verdict

N, E, D = 5, 6, 16


def _federation(noise=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    roles = torch.randn(2, E, D, generator=gen)  # 2 layers
    signature = torch.stack([roles + noise * torch.randn(2, E, D, generator=gen) for _ in range(N)])
    return torch.full((N, 2, E), 1.0 / E), torch.full((N, 2, E), 10.0), signature


def test_agreeing_clients_are_told_that_fedalign_averages_as_fedavg():
    usage, tokens, signature = _federation()
    rows = premise([0, 1], usage, tokens, signature)
    assert all(r.role_agreement == 1.0 and r.moved_share == 0.0 and r.routing_js_mean < 1e-12 for r in rows)
    assert all(abs(r.matched_similarity - r.same_number_similarity) < 1e-12 for r in rows)
    assert verdict(rows).startswith("experts agree in every layer") and "gating preferences agree" in verdict(rows)


def test_a_renumbered_client_and_diverging_routing_are_reported_per_layer():
    usage, tokens, signature = _federation()
    signature[3, 1] = signature[3, 1, [1, 0, 3, 2, 5, 4]]  # client 3 renumbered every expert of layer 1
    usage[0, 0] = torch.tensor([0.9, 0.1, 0, 0, 0, 0])  # client 0 routes layer 0 elsewhere
    rows = premise([0, 1], usage, tokens, signature)
    assert rows[0].role_agreement == 1.0 and rows[0].routing_js_mean > 0.05
    # 4 of the 10 pairs hold client 3, each with all 6 experts swapped
    assert rows[1].role_agreement == 1 - 4 / 10 and rows[1].moved_share == 4 / 10
    assert rows[1].matched_similarity - rows[1].same_number_similarity > 0.3
    line = verdict(rows)
    assert "40% of expert pairs are renumbered between clients in layer(s) 1" in line
    assert "strategy.fedalign.match=true" in line and "gating preferences diverge in layer(s) 0" in line


def test_inactive_experts_are_left_out_of_the_comparison():
    usage, tokens, signature = _federation()
    tokens[2, :, 4:] = 0  # client 2 never routed to experts 4 and 5
    signature[2, :, 4:] = torch.randn(2, 2, D)  # whatever it would report for them
    rows = premise([0, 1], usage, tokens, signature)
    assert all(r.role_agreement == 1.0 for r in rows)


def test_experts_without_roles_across_clients_are_not_called_renumbered():
    """Every client's experts unrelated to every other's (a random start that each client's
    data pulled its own way): a matching always finds some gain, but matched partners are no
    more alike than any two experts."""
    usage, tokens, _ = _federation()
    signature = torch.randn(N, 2, E, 128, generator=torch.Generator().manual_seed(1))  # hidden size 128
    rows = premise([0, 1], usage, tokens, signature)
    assert all(r.matched_similarity - r.same_number_similarity > 0.03 and r.role_contrast < 0.2 for r in rows)
    assert verdict(rows).startswith("experts have no roles that carry across clients in layer(s) 0, 1")

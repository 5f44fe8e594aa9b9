"""FedAlign-MoE formulas on hand-computed cases: 3 clients, 2 layers, 4 experts. Expected
values are written out with plain Python arithmetic, not with the code under test."""
import math

import pytest
import torch

from fedalign_dist.aggregation import alignment as A

N_EX = torch.tensor([10.0, 20.0, 30.0])
# usage[i][l] over 4 experts
U = torch.tensor([
    [[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]],
    [[0.1, 0.7, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]],
    [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]],
])


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _js(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def test_consensus_is_examples_weighted_mean():
    pbar = A.consensus_distribution(U, N_EX)
    assert pbar.shape == (2, 4)
    torch.testing.assert_close(pbar[0], torch.tensor([16.5, 22.5, 10.5, 10.5]) / 60)
    torch.testing.assert_close(pbar[1], torch.tensor([4 + 2 + 7.5, 3 + 4 + 7.5, 2 + 6 + 7.5, 1 + 8 + 7.5]) / 60)


def test_js_divergence_matches_hand_value_and_bounds():
    p, q = [0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]
    assert float(A.js_divergence(torch.tensor(p), torch.tensor(q))) == pytest.approx(_js(p, q), rel=1e-5)
    assert float(A.js_divergence(torch.tensor(p), torch.tensor(p))) == pytest.approx(0.0, abs=1e-7)
    disjoint = A.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert float(disjoint) == pytest.approx(math.log(2), rel=1e-4)


def test_consistency_weights_and_prior_by_hand():
    pbar = A.consensus_distribution(U, N_EX)
    c = A.routing_consistency(U, pbar, temperature=0.1)
    for i in range(3):
        for l in range(2):
            expected = math.exp(-_js(U[i, l].tolist(), pbar[l].tolist()) / 0.1)
            assert float(c[i, l]) == pytest.approx(expected, rel=1e-5)
    w = A.consistency_weights(N_EX, c, U)
    for l in range(2):
        for e in range(4):
            mass = [float(N_EX[i] * c[i, l] * U[i, l, e]) for i in range(3)]
            for i in range(3):
                assert float(w[i, l, e]) == pytest.approx(mass[i] / sum(mass), rel=1e-5)
    prior = A.routing_prior(N_EX, c, U)
    for l in range(2):
        mass = [sum(float(N_EX[i] * c[i, l] * U[i, l, e]) for i in range(3)) + 1e-8 for e in range(4)]
        torch.testing.assert_close(prior[l], torch.tensor([m / sum(mass) for m in mass]))


def test_infinite_temperature_switches_consistency_off():
    c = A.routing_consistency(U, A.consensus_distribution(U, N_EX), temperature=math.inf)
    assert torch.equal(c, torch.ones(3, 2))


def test_weights_sum_to_one_per_expert():
    c = A.routing_consistency(U, A.consensus_distribution(U, N_EX), 0.1)
    torch.testing.assert_close(A.consistency_weights(N_EX, c, U).sum(0), torch.ones(2, 4))
    aligned = torch.tensor([[[True] * 4] * 2, [[True, False, True, False]] * 2, [[False, False, True, True]] * 2])
    w = A.expert_update_weights(N_EX, U, aligned)
    torch.testing.assert_close(w.sum(0), torch.ones(2, 4))
    assert float(w[1, 0, 1]) == 0.0 and float(w[2, 0, 0]) == 0.0
    # expert 1, layer 0: only client 0 aligned -> weight 1
    assert float(w[0, 0, 1]) == pytest.approx(1.0)
    # expert 2, layer 0: all three: n_i u_i(2) = 1, 2, 7.5
    assert float(w[2, 0, 2]) == pytest.approx(7.5 / 10.5)


def test_active_mask_and_token_weights():
    tokens = torch.tensor([[[0.0, 5, 1, 2]], [[0, 0, 3, 2]], [[4, 0, 0, 0]]])
    assert A.active_mask(tokens, 1).tolist() == [[[False, True, True, True]], [[False, False, True, True]],
                                                  [[True, False, False, False]]]
    w = A.token_weights(tokens)
    torch.testing.assert_close(w[:, 0, 2], torch.tensor([0.25, 0.75, 0.0]))
    torch.testing.assert_close(w[:, 0, 3], torch.tensor([0.5, 0.5, 0.0]))
    assert float(w[2, 0, 0]) == 1.0 and float(w[:, 0, 1].sum()) == 1.0


# Signatures of one (layer, expert) for 3 clients: (1,0), (0,1), (1,1)/sqrt 2; masses 1, 1, 2.
H = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
MASS = torch.tensor([1.0, 1.0, 2.0])
ALL = torch.ones(3, dtype=torch.bool)
R = 1 / math.sqrt(2)


def test_centroid_selection_by_hand():
    # z = normalise(1*(1,0) + 1*(0,1) + 2*(r,r)) = (r, r): s = (r, r, 1)
    s = [R, R, 1.0]
    mean = sum(s) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / 3)
    wide = A.centroid_selection(H, MASS, ALL, beta=1.0)
    assert wide.tau == pytest.approx(mean - std, rel=1e-6)
    assert wide.aligned.tolist() == [True, True, True]
    assert wide.similarity_mean == pytest.approx(mean, rel=1e-6)
    strict = A.centroid_selection(H, MASS, ALL, beta=0.0)
    assert strict.tau == pytest.approx(mean, rel=1e-6)
    assert strict.aligned.tolist() == [False, False, True]


def test_pairwise_selection_by_hand():
    # sims: 12 = 0, 13 = 23 = r; pairs i != j: mean M = 2r/3, population std S
    pairs = [0.0, R, R]
    m = sum(pairs) / 3
    s = math.sqrt(sum((x - m) ** 2 for x in pairs) / 3)
    wide = A.pairwise_selection(H, MASS, ALL, beta=1.0)
    assert wide.tau == pytest.approx(m - s, rel=1e-6)
    assert wide.aligned.tolist() == [True, True, True]
    strict = A.pairwise_selection(H, MASS, ALL, beta=0.0)
    assert strict.tau == pytest.approx(m, rel=1e-6)
    # row means: (0 + r)/2, (0 + r)/2, r -> only client 2 reaches tau = 2r/3
    assert strict.aligned.tolist() == [False, False, True]
    # client 0 links to itself and to client 2 (sim r >= tau): weights 1 : 2
    torch.testing.assert_close(strict.gate[0], torch.tensor([1 / 3, 0.0, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(strict.gate.sum(1), torch.ones(3, dtype=torch.float64))


def test_the_floor_keeps_agreeing_clients_and_still_drops_a_dissimilar_outlier():
    # 4 clients that agree: signatures (1, t) at small angles; masses equal
    agree = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [1.0, 0.4]])
    mass, everyone = torch.ones(4), torch.ones(4, dtype=torch.bool)
    unit = [(1 / math.hypot(1, t), t / math.hypot(1, t)) for t in (0.0, 0.1, 0.2, 0.4)]
    z = [sum(u[k] for u in unit) for k in range(2)]
    z = [v / math.hypot(*z) for v in z]
    s = [u[0] * z[0] + u[1] * z[1] for u in unit]  # every cosine > 0.97
    mean = sum(s) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / 4)
    old = A.centroid_selection(agree, mass, everyone, beta=1.0)  # floor 1: the first rule
    assert old.tau == pytest.approx(mean - std, rel=1e-6)  # the signatures are float32
    assert old.aligned.tolist() == [x >= mean - std for x in s] == [True, True, True, False]
    floored = A.centroid_selection(agree, mass, everyone, beta=1.0, floor=0.5)
    assert floored.tau == 0.5 and floored.aligned.all()
    # a client whose expert means something else (cosine 0 to the others) is still dropped
    odd = torch.cat([agree[:3], torch.tensor([[0.0, -1.0]])])
    assert A.centroid_selection(odd, mass, everyone, beta=1.0, floor=0.5).aligned.tolist() == [True, True, True, False]
    # pairwise: M - beta * S over the 6 pair cosines, against the floor
    pairs = [unit[i][0] * unit[j][0] + unit[i][1] * unit[j][1] for i in range(4) for j in range(4) if i != j]
    m = sum(pairs) / len(pairs)
    sd = math.sqrt(sum((x - m) ** 2 for x in pairs) / len(pairs))
    assert A.pairwise_selection(agree, mass, everyone, beta=1.0).tau == pytest.approx(m - sd, rel=1e-6)
    assert A.pairwise_selection(agree, mass, everyone, beta=1.0, floor=0.5).tau == 0.5
    assert A.pairwise_selection(agree, mass, everyone, beta=1.0, floor=0.5).aligned.all()


def test_centered_signatures_subtract_the_mean_over_active_experts():
    sig = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]]])  # 1 client, 1 layer, 3 experts
    active = torch.tensor([[[True, True, False]]])
    out = A.centered_signatures(sig, active)  # mean of the two active ones: (2, 3)
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]]]))


def test_centering_reveals_a_permuted_client_that_the_shared_direction_hides():
    """Every expert's signature = a large shared part c + its own part; client 3 has experts
    0 and 1 swapped. Raw cosines stay near 1 (c dominates), so the floor keeps client 3;
    centred per client, its expert 0 points where the others' expert 1 does."""
    common, own = torch.tensor([10.0, 0.0, 0.0]), torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    honest = common + own  # (E=3, D=3)
    permuted = honest[[1, 0, 2]]
    sig = torch.stack([honest, honest, honest, permuted])[:, None]  # (N=4, L=1, E=3, D=3)
    active = torch.ones(4, 1, 3, dtype=torch.bool)
    mass = torch.ones(4)
    raw = A.centroid_selection(sig[:, 0, 0], mass, active[:, 0, 0], beta=1.0, floor=0.5)
    assert raw.aligned.all()  # cosine of (10, 1, 0) and (10, -1, 0) is 0.98
    centred = A.centered_signatures(sig, active)
    caught = A.centroid_selection(centred[:, 0, 0], mass, active[:, 0, 0], beta=1.0, floor=0.5)
    assert caught.aligned.tolist() == [True, True, True, False]
    # expert 2 is where it should be on every client: nobody is left out
    assert A.centroid_selection(centred[:, 0, 2], mass, active[:, 0, 2], beta=1.0, floor=0.5).aligned.all()


def test_a_heavy_outlier_becomes_the_mass_weighted_centroid():
    # four clients agree on (1, 0); one holding 10 of 14 units of mass says (0, 1)
    sig = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]])
    everyone = torch.ones(5, dtype=torch.bool)
    heavy = A.centroid_selection(sig, torch.tensor([1.0, 1, 1, 1, 10]), everyone, beta=1.0, floor=0.5)
    # centre (4, 10) / |.|: scores 4/sqrt(116) (x4) and 10/sqrt(116); tau = mean - std < both
    s_honest, s_odd = 4 / math.sqrt(116), 10 / math.sqrt(116)
    mean = (4 * s_honest + s_odd) / 5
    std = math.sqrt((4 * (s_honest - mean) ** 2 + (s_odd - mean) ** 2) / 5)
    assert heavy.tau == pytest.approx(mean - std, rel=1e-6) and heavy.aligned.all()
    # one vote each: centre (4, 1) / |.|; the outlier scores 1/sqrt(17) < the floor 0.5 < mean - std
    uniform = A.centroid_selection(sig, torch.ones(5), everyone, beta=1.0, floor=0.5)
    assert uniform.tau == 0.5 and uniform.aligned.tolist() == [True, True, True, True, False]


@pytest.mark.parametrize("select", [A.centroid_selection, A.pairwise_selection])
def test_small_n_fallback_and_inactive_clients(select):
    two_active = torch.tensor([True, False, True])
    chosen = select(H, MASS, two_active, beta=0.0)
    assert chosen.aligned.tolist() == [True, False, True] and math.isnan(chosen.tau)
    none = select(H, MASS, torch.zeros(3, dtype=torch.bool), beta=1.0)
    assert not none.aligned.any()
    everyone = select(H, MASS, ALL, beta=math.inf)
    assert everyone.aligned.all() and math.isnan(everyone.tau)


@pytest.mark.parametrize("select", [A.centroid_selection, A.pairwise_selection])
def test_aligned_set_is_never_empty(select):
    # A huge negative beta puts tau above every score; the best client still stays in.
    chosen = select(H, MASS, ALL, beta=-100.0)
    assert chosen.aligned.sum() == 1


def test_kl_regulariser_is_zero_at_the_prior_and_differentiable():
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], requires_grad=True)
    assert float(A.kl_divergence(q.detach(), torch.full((4,), 0.25))) == pytest.approx(0.0, abs=1e-7)
    p = torch.tensor([0.6, 0.2, 0.1, 0.1])
    value = A.kl_divergence(q, p)
    assert float(value) == pytest.approx(_kl([0.25] * 4, p.tolist()), rel=1e-5)
    value.backward()
    assert torch.isfinite(q.grad).all()

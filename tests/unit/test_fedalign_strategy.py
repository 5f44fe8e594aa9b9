"""FedAlign-MoE and FedMoE as whole strategies on a real tiny Mixtral's parameter layout
(one process): properties, the misaligned-expert scenario, personal experts."""
import math

import pytest
import torch

from fedalign_dist.clients.state import DiskClientStore, MemoryClientStore
from fedalign_dist.config import ConfigError, load_config
from fedalign_dist.distributed.communicator import Communicator
from fedalign_dist.strategies import ClientUpdate, build_strategy
from fedalign_dist.strategies.expertwise import ALIGNED, PERSONAL_KEY, ClientTable
from tests.unit.tiny_layout import tiny_mixtral_layout

E, L, D = 4, 2, 16
COMM = Communicator(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def layout():
    return tiny_mixtral_layout(E)


def _strategy(layout, name="fedalign", *overrides, store=None):
    cfg = load_config(None, [f"strategy.name={name}", f"model.num_experts={E}", *overrides])
    return build_strategy(cfg, layout[0], store if store is not None else MemoryClientStore())


def _random_delta(state, gen, scale=1.0):
    return {n: torch.randn(t.shape, generator=gen) * scale for n, t in state.items()}


def _stats(usage=None, tokens=None, signature=None, gen=None):
    usage = usage if usage is not None else torch.full((L, E), 1.0 / E)
    return {"usage": usage, "load": usage.clone(), "tokens": tokens if tokens is not None else torch.full((L, E), 10.0),
            "signature": signature if signature is not None else torch.randn(L, E, D, generator=gen)}


def _updates(state, num, seed=0, same=False):
    gen = torch.Generator().manual_seed(seed)
    shared = _random_delta(state, gen), _stats(gen=gen)
    out = []
    for i in range(num):
        delta, stats = shared if same else (_random_delta(state, gen), _stats(
            usage=torch.softmax(torch.randn(L, E, generator=gen), -1), gen=gen))
        out.append(ClientUpdate(i, 10 + 5 * i, {n: t.clone() for n, t in delta.items()},
                                0.0, {k: v.clone() for k, v in stats.items()}))
    return out


def _close(a, b, **kw):
    for name in a:
        torch.testing.assert_close(a[name], b[name], **kw)


def test_identical_clients_give_fedavg(layout):
    _, state = layout
    ups = _updates(state, 4, same=True)
    aligned, diag = _strategy(layout).aggregate(state, ups, COMM)
    fedavg, _ = _strategy(layout, "fedavg").aggregate(state, ups, COMM)
    _close(aligned, fedavg, rtol=1e-5, atol=1e-6)
    assert diag["aligned_fraction"] == 1.0 and diag["consistency_min"] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["centroid", "pairwise"])
def test_invariant_to_client_order(layout, mode):
    _, state = layout
    ups = _updates(state, 5, seed=3)
    extra = [f"strategy.fedalign.mode={mode}", "strategy.fedalign.comm=allgather"]
    first, _ = _strategy(layout, "fedalign", *extra).aggregate(state, ups, COMM)
    second, _ = _strategy(layout, "fedalign", *extra).aggregate(state, ups[::-1], COMM)
    _close(first, second, rtol=1e-5, atol=1e-6)


def test_no_selection_no_consistency_equal_usage_is_usage_weighted_average(layout):
    anatomy, state = layout
    ups = _updates(state, 4, seed=5)
    for u in ups:
        u.stats["usage"] = torch.full((L, E), 1.0 / E)
    strategy = _strategy(layout, "fedalign", "strategy.fedalign.beta=inf",
                         "strategy.fedalign.consistency_temperature=inf")
    new, diag = strategy.aggregate(state, ups, COMM)
    n = torch.tensor([float(u.num_examples) for u in ups])
    for name in state:
        # equal usage: n_i u_i(e) / sum_j n_j u_j(e) = n_i / sum n for every expert and router row
        expected = state[name] + sum(w * u.delta[name] for w, u in zip(n / n.sum(), ups))
        torch.testing.assert_close(new[name], expected, rtol=1e-5, atol=1e-6)
    assert diag["aligned_fraction"] == 1.0 and diag["tau_mean"] is None


def test_router_rows_follow_consistency_weights(layout):
    """As first specified: every client's row e, weighted by routing consistency alone."""
    anatomy, state = layout
    ups = _updates(state, 3, seed=7)
    strategy = _strategy(layout, "fedalign", "strategy.fedalign.router_rows_follow_experts=false")
    new, _ = strategy.aggregate(state, ups, COMM)
    from fedalign_dist.aggregation import alignment as A
    usage, n = torch.stack([u.stats["usage"] for u in ups]), torch.tensor([float(u.num_examples) for u in ups])
    c = A.routing_consistency(usage, A.consensus_distribution(usage, n), 0.1)
    w = A.consistency_weights(n, c, usage)
    router = anatomy.names_of("router", among=state)[0]
    li = anatomy.layers().index(anatomy.role(router).layer)
    for e in range(E):
        expected = state[router][e] + sum(w[i, li, e] * ups[i].delta[router][e] for i in range(3))
        torch.testing.assert_close(new[router][e], expected, rtol=1e-5, atol=1e-6)


def _misaligned_round(state, anatomy, swapped_client=2, a=0, b=1, num=6, shared=0.0, swapped_examples=20):
    """Clients agree on what each expert does, except one on which experts a and b swapped
    roles: its deltas of experts and router rows a and b, and its signatures, are exchanged
    (its routing distribution looks normal: usage is uniform). `shared`: the length of a
    direction common to every expert's signature (as on a pretrained model)."""
    gen = torch.Generator().manual_seed(11)
    true_delta = _random_delta(state, gen)
    # experts with distinct roles: orthogonal signatures (random ones in 16 dimensions can
    # have cosines of 0.4, which the similarity floor rightly calls similar)
    true_sig = 4 * torch.stack([torch.linalg.qr(torch.randn(D, E, generator=gen))[0].T for _ in range(L)])
    true_sig = true_sig + shared * torch.nn.functional.normalize(torch.randn(L, 1, D, generator=gen), dim=-1)
    ups = []
    for i in range(num):
        delta = {n: t + 0.05 * torch.randn(t.shape, generator=gen) for n, t in true_delta.items()}
        sig = true_sig + 0.05 * torch.randn(L, E, D, generator=gen)
        if i == swapped_client:
            for name in anatomy.names_of("expert", "router", among=delta):
                ta, tb = delta[name][a].clone(), delta[name][b].clone()
                delta[name][a], delta[name][b] = tb, ta
            sig[:, [a, b]] = sig[:, [b, a]]
        ups.append(ClientUpdate(i, swapped_examples if i == swapped_client else 20, delta, 0.0, _stats(signature=sig)))
    return ups


@pytest.mark.parametrize("mode", ["centroid", "pairwise"])
def test_misaligned_expert_is_excluded_and_not_blurred(layout, mode):
    anatomy, state = layout
    ups = _misaligned_round(state, anatomy)
    store = MemoryClientStore()
    strategy = _strategy(layout, "fedalign", f"strategy.fedalign.mode={mode}", "strategy.fedalign.comm=allgather",
                         store=store)
    plan = strategy.plan(ClientTable.from_rows([(u.client_id, u.num_examples, u.stats) for u in ups]))
    aligned = plan.weights.expert > 0
    assert not aligned[2, :, 0].any() and not aligned[2, :, 1].any()  # excluded for the swapped experts
    # the similarity floor keeps every honest client (mean - beta * std alone trimmed their low tail)
    assert aligned[[0, 1, 3, 4, 5]].all()

    new, diag = strategy.aggregate(state, ups, COMM)
    blurred, _ = _strategy(layout, "fedavg").aggregate(state, ups, COMM)
    others = [u for u in ups if u.client_id != 2]
    for name in anatomy.names_of("expert", among=state):
        for e in (0, 1):
            target = state[name][e] + sum(u.delta[name][e] for u in others) / len(others)
            err_aligned = float((new[name][e] - target).norm() / target.norm())
            err_fedavg = float((blurred[name][e] - target).norm() / target.norm())
            assert err_aligned < 0.05, (name, e, err_aligned)
            assert err_fedavg > 0.15 and err_fedavg > 5 * err_aligned, (name, e, err_fedavg, err_aligned)
    assert diag["aligned_fraction"] < 1.0

    # The swapped client keeps its own experts a and b as personal experts (pairwise: nobody
    # else is similar, so its gated mix is itself) and starts from them next time.
    personal = store.get(2, PERSONAL_KEY)
    name = anatomy.names_of("expert", among=state)[0]
    li = anatomy.layers().index(anatomy.role(name).layer)
    assert {k for k in personal if k.startswith(name + "|")} == {
        f"{name}|{e}" for e in range(E) if plan.personal[2, li, e] != ALIGNED}
    torch.testing.assert_close(personal[f"{name}|0"], state[name][0] + ups[2].delta[name][0])
    start = strategy.client_start_state(2, new, store)
    torch.testing.assert_close(start[name][0], state[name][0] + ups[2].delta[name][0])
    for e in range(E):
        if plan.personal[2, li, e] == ALIGNED:
            torch.testing.assert_close(start[name][e], new[name][e])
    honest = [c for c in range(6) if c != 2 and (plan.personal[c] == ALIGNED).all()]
    assert honest, "expected some client aligned on every expert"
    assert store.get(honest[0], PERSONAL_KEY) is None
    assert strategy.client_start_state(honest[0], new, store) is new


@pytest.mark.parametrize("center", [False, True])
def test_centred_signatures_catch_a_permutation_that_a_shared_direction_hides(layout, center):
    anatomy, state = layout
    ups = _misaligned_round(state, anatomy, shared=30.0)  # raw cosines between experts ~0.97
    strategy = _strategy(layout, "fedalign", f"strategy.fedalign.center_signatures={str(center).lower()}")
    plan = strategy.plan(ClientTable.from_rows([(u.client_id, u.num_examples, u.stats) for u in ups]))
    aligned = plan.weights.expert > 0
    assert aligned[[0, 1, 3, 4, 5]].all()  # honest clients are never trimmed
    swapped_kept = bool(aligned[2, :, 0].any() or aligned[2, :, 1].any())
    assert swapped_kept != center  # raw: missed in some layer; centred: excluded everywhere
    if center:  # its mean over experts does not depend on their order: its other experts match
        assert aligned[2, :, 2:].all()


@pytest.mark.parametrize("weights", ["mass", "uniform"])
def test_a_heavy_permuted_client_pulls_the_mass_weighted_centroid(layout, weights):
    """The swapped client holds 400 of 500 examples: weighted by mass, the centroid of
    experts 0 and 1 is its own signature, so it looks aligned and the honest clients look
    like the outliers; one client, one vote (`uniform`) leaves it out."""
    anatomy, state = layout
    ups = _misaligned_round(state, anatomy, num=6, swapped_examples=400)
    strategy = _strategy(layout, "fedalign", f"strategy.fedalign.centroid_weights={weights}")
    plan = strategy.plan(ClientTable.from_rows([(u.client_id, u.num_examples, u.stats) for u in ups]))
    aligned = plan.weights.expert > 0
    if weights == "mass":
        assert aligned[2, :, :2].all()
        return
    with pytest.raises(ConfigError, match="centroid_weights=uniform"):
        _strategy(layout, "fedalign", "strategy.fedalign.centroid_weights=uniform", "strategy.fedalign.mode=pairwise",
                  "strategy.fedalign.comm=allgather")
    assert not aligned[2, :, :2].any() and aligned[[0, 1, 3, 4, 5]].all()


@pytest.mark.parametrize("follow", [True, False])
def test_router_rows_of_a_permuted_client_follow_its_experts(layout, follow):
    """The revision: a client left out of expert e's aligned set is left out of router row e
    (the others' weights renormalised) and keeps its own row e with its personal expert.
    As first specified (follow=false), the permuted client's rows blur the global rows as
    much as FedAvg does."""
    anatomy, state = layout
    ups = _misaligned_round(state, anatomy)
    store = MemoryClientStore()
    strategy = _strategy(layout, "fedalign", f"strategy.fedalign.router_rows_follow_experts={str(follow).lower()}",
                         store=store)
    plan = strategy.plan(ClientTable.from_rows([(u.client_id, u.num_examples, u.stats) for u in ups]))
    new, _ = strategy.aggregate(state, ups, COMM)
    blurred, _ = _strategy(layout, "fedavg").aggregate(state, ups, COMM)
    others = [u for u in ups if u.client_id != 2]
    for router in anatomy.names_of("router", among=state):
        li = anatomy.layers().index(anatomy.role(router).layer)
        for e in (0, 1):
            assert plan.personal[2, li, e] != ALIGNED
            # equal examples and uniform usage: the honest rows' plain mean is the target
            target = state[router][e] + sum(u.delta[router][e] for u in others) / len(others)
            err = float((new[router][e] - target).norm() / target.norm())
            err_fedavg = float((blurred[router][e] - target).norm() / target.norm())
            assert err_fedavg > 0.1
            if follow:
                assert err < 1e-5, (router, e, err)
                torch.testing.assert_close(store.get(2, PERSONAL_KEY)[f"{router}|{e}"],
                                           state[router][e] + ups[2].delta[router][e])
            else:
                assert err > 0.5 * err_fedavg, (router, e, err, err_fedavg)
                assert f"{router}|{e}" not in (store.get(2, PERSONAL_KEY) or {})
    if follow:  # next round the client starts from its own rows and experts a and b
        start = strategy.client_start_state(2, new, store)
        router = anatomy.names_of("router", among=state)[0]
        torch.testing.assert_close(start[router][0], state[router][0] + ups[2].delta[router][0])
        torch.testing.assert_close(start[router][2], new[router][2])  # an aligned row: global


@pytest.mark.parametrize("store_kind", ["memory", "disk"])
def test_personal_copy_is_dropped_once_realigned(layout, store_kind, tmp_path):
    anatomy, state = layout
    store = MemoryClientStore() if store_kind == "memory" else DiskClientStore(tmp_path)
    strategy = _strategy(layout, store=store)
    strategy.aggregate(state, _misaligned_round(state, anatomy), COMM)
    assert store.get(2, PERSONAL_KEY) is not None
    honest = _misaligned_round(state, anatomy, swapped_client=-1)
    strategy = _strategy(layout, "fedalign", "strategy.fedalign.beta=inf", store=store)  # everyone aligned
    strategy.aggregate(state, honest, COMM)
    assert store.get(2, PERSONAL_KEY) is None


def test_fedmoe_averages_experts_over_routing_clients_by_tokens(layout):
    anatomy, state = layout
    ups = _updates(state, 3, seed=13)
    tokens = torch.zeros(3, L, E)
    tokens[0, :, 0], tokens[1, :, 0], tokens[2, :, 1] = 30, 10, 5  # expert 2, 3: nobody
    for u, t in zip(ups, tokens):
        u.stats["tokens"] = t
    new, _ = _strategy(layout, "fedmoe").aggregate(state, ups, COMM)
    n = torch.tensor([float(u.num_examples) for u in ups])
    for name in anatomy.names_of("expert", among=state):
        torch.testing.assert_close(new[name][0], state[name][0] + 0.75 * ups[0].delta[name][0]
                                   + 0.25 * ups[1].delta[name][0])
        torch.testing.assert_close(new[name][1], state[name][1] + ups[2].delta[name][1])
        torch.testing.assert_close(new[name][2:], state[name][2:])
    for name in anatomy.names_of("router", "other", among=state):
        expected = state[name] + sum(w * u.delta[name] for w, u in zip(n / n.sum(), ups))
        torch.testing.assert_close(new[name], expected, rtol=1e-5, atol=1e-6)


def test_prior_is_kept_in_strategy_state(layout):
    _, state = layout
    strategy = _strategy(layout)
    assert strategy.state_dict()["prior"] is None
    strategy.aggregate(state, _updates(state, 3), COMM)
    prior = strategy.state_dict()["prior"]
    assert prior.shape == (L, E) and torch.allclose(prior.sum(-1), torch.ones(L))
    fresh = _strategy(layout)
    fresh.load_state_dict(strategy.state_dict())
    probs = [torch.softmax(torch.randn(7, E), -1) for _ in range(L)]
    torch.testing.assert_close(fresh.routing_regularizer(probs), strategy.routing_regularizer(probs))
    assert _strategy(layout, "fedalign", "strategy.fedalign.mu=0").routing_regularizer(probs) is None
    assert not math.isnan(float(strategy.routing_regularizer(probs)))

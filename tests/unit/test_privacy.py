"""Client-level DP (fedalign_dist/privacy): clipping bounds a client's contribution, the noise
has the configured standard deviation, statistics are bounded whatever the data, the
accountant is the library's, and the config refuses statements that would be false."""
import math

import dp_accounting
import pytest
import torch

from fedalign_dist.clients.state import MemoryClientStore
from fedalign_dist.config import ConfigError, load_config
from fedalign_dist.distributed.communicator import Communicator
from fedalign_dist.privacy import noise
from fedalign_dist.privacy.accountant import epsilon, round_mechanism
from fedalign_dist.privacy.clipping import clip_update, next_clip_norm
from fedalign_dist.privacy.mechanism import ClientLevelDP
from fedalign_dist.privacy.statistics import bounded, privatize
from fedalign_dist.strategies import ClientUpdate, build_strategy
from tests.unit.tiny_layout import tiny_mixtral_layout

E, L, D = 4, 2, 16
COMM = Communicator(0, 1, torch.device("cpu"))
DP = ["privacy.enabled=true", "privacy.delta=1e-3", "privacy.noise_seed=7"]


@pytest.fixture(scope="module")
def layout():
    return tiny_mixtral_layout(E)


def _setup(layout, name, *overrides):
    cfg = load_config(None, [f"strategy.name={name}", f"model.num_experts={E}", *DP, *overrides])
    strategy = build_strategy(cfg, layout[0], MemoryClientStore())
    return cfg, strategy, ClientLevelDP(cfg, strategy, cfg.privacy.noise_seed)


def _stats(gen, scale=1.0):
    return {"usage": torch.softmax(torch.randn(L, E, generator=gen), -1), "load": torch.rand(L, E, generator=gen),
            "tokens": torch.randint(0, 50, (L, E), generator=gen).float() * scale,
            "signature": torch.randn(L, E, D, generator=gen) * scale}


def _client_updates(dp, state, seeds, scales, with_stats):
    """Each client's update and statistics as its rank sends them under DP."""
    out = []
    for cid, (seed, scale) in enumerate(zip(seeds, scales)):
        gen = torch.Generator().manual_seed(seed)
        delta = {n: torch.randn(t.shape, generator=gen) * 0.01 * scale for n, t in state.items()}
        stats = _stats(gen, scale) if with_stats else {}
        delta, stats, _ = dp.privatize_client(0, cid, delta, stats)
        out.append(ClientUpdate(cid, 1, delta, 0.0, stats))
    return out


def _norm(a, b):
    return math.sqrt(sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a))


@pytest.mark.parametrize("name", ["fedavg", "fedmoe", "fedalign"])
def test_a_huge_update_moves_the_aggregate_by_at_most_its_clipped_weight(layout, name):
    """Neighbouring rounds that differ in one client's data (replace-one): honest, or a client
    whose update is a million times larger. Without noise the two aggregates differ by at most
    2 C times that client's largest weight, and unclipped they would differ by far more."""
    anatomy, state = layout
    cfg, strategy, dp = _setup(layout, name, "privacy.clip_norm=0.05", "privacy.noise_multiplier=0",
                               "privacy.statistics_noise_multiplier=0")
    honest = _client_updates(dp, state, [1, 2, 3, 4], [1, 1, 1, 1], strategy.shares_statistics)
    attacked = _client_updates(dp, state, [1, 2, 3, 99], [1, 1, 1, 1e6], strategy.shares_statistics)
    for ups in (honest, attacked):
        assert all(_norm(u.delta, {n: torch.zeros_like(t) for n, t in u.delta.items()}) <= 0.05 * (1 + 1e-6)
                   for u in ups)
    a, _ = strategy.aggregate(state, honest, COMM)
    b, _ = build_strategy(cfg, anatomy, MemoryClientStore()).aggregate(state, attacked, COMM)
    # the bound per parameter block: 2 C times the attacked client's weight (statistics fixed by the plan)
    for name_ in state:
        assert float((a[name_] - b[name_]).abs().max()) <= 2 * 0.05 + 1e-6
    assert _norm(a, b) <= 2 * 0.05 + 1e-6
    if name == "fedavg":  # uniform weights 1/4: the whole update moves by at most 2 C / 4
        assert _norm(a, b) <= 2 * 0.05 / 4 + 1e-6


def test_the_aggregate_gets_noise_of_the_configured_std_once(layout):
    anatomy, state = layout
    cfg, strategy, dp = _setup(layout, "fedavg", "privacy.clip_norm=0.3", "privacy.noise_multiplier=2.0")
    ups = _client_updates(dp, state, [1, 2, 3, 4], [1, 1, 1, 1], False)
    clean, _ = strategy.aggregate(state, ups, COMM)
    noised, info = dp.noise_aggregate(0, clean, COMM)
    diff = torch.cat([(noised[n] - clean[n]).flatten() for n in clean]).double()
    expected = 2.0 * 0.3 / 4  # z C / clients
    assert diff.numel() > 100_000
    assert diff.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(diff.mean().item()) < 4 * expected / math.sqrt(diff.numel())
    assert info["dp_noise_std_max"] == pytest.approx(expected)
    again, _ = dp.noise_aggregate(0, clean, COMM)  # every rank draws the same noise: one draw in total
    assert all(torch.equal(again[n], noised[n]) for n in clean)
    other, _ = dp.noise_aggregate(1, clean, COMM)
    assert not torch.equal(other[next(iter(clean))], noised[next(iter(clean))])


def test_expertwise_noise_follows_each_blocks_largest_weight(layout):
    """An expert that only one client trained gets noise z C (its weight is 1); the shared
    parameters z C / clients."""
    anatomy, state = layout
    cfg, strategy, dp = _setup(layout, "fedmoe", "privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0",
                               "privacy.statistics_noise_multiplier=0")
    ups = _client_updates(dp, state, [1, 2, 3], [1, 1, 1], True)
    for i, u in enumerate(ups):  # expert 0 only used by client 0
        u.stats["tokens"][:, 0] = 100.0 if i == 0 else 0.0
    strategy.aggregate(state, ups, COMM)
    largest = strategy.max_client_weight(state, COMM)
    expert = anatomy.names_of("expert", among=state)[0]
    other = next(n for n in state if anatomy.role(n).kind not in ("expert", "router"))
    assert float(torch.as_tensor(largest[expert]).reshape(-1)[0]) == pytest.approx(1.0)
    assert float(torch.as_tensor(largest[other])) == pytest.approx(1 / 3)


def test_clipping_leaves_a_small_update_bitwise_and_scales_a_large_one():
    delta = {"a": torch.tensor([3.0, 4.0])}
    same, norm = clip_update(delta, 10.0)
    assert same["a"] is delta["a"] and norm == 5.0
    scaled, _ = clip_update(delta, 1.0)
    assert torch.allclose(scaled["a"], torch.tensor([0.6, 0.8]))


def test_adaptive_clip_moves_towards_the_target_quantile():
    assert next_clip_norm(1.0, 10, 10, 0.5, 0.2) == pytest.approx(math.exp(-0.1))  # all within: shrink
    assert next_clip_norm(1.0, 0, 10, 0.5, 0.2) == pytest.approx(math.exp(0.1))  # none within: grow
    assert next_clip_norm(1.0, 5, 10, 0.5, 0.2) == pytest.approx(1.0)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_statistics_are_bounded_whatever_the_data(scale):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        stats = _stats(gen, scale)
        stats["usage"] = stats["usage"] * scale - 0.5
        stats["signature"][0, 0, 0] = float("nan")
        rows = {k: bounded(k, v) for k, v in stats.items()}
        assert all(torch.isfinite(r).all() and r.norm() <= 1 + 1e-9 for r in rows.values())
    # any two clients' rows differ by at most 2 sqrt(k): the sensitivity the accountant uses
    a, b = _stats(gen), _stats(gen, 1e9)
    diff = math.sqrt(sum(float((bounded(k, a[k]) - bounded(k, b[k])).pow(2).sum()) for k in a))
    assert diff <= 2 * math.sqrt(len(a))


def test_privatized_statistics_keep_their_form_and_carry_the_configured_noise():
    gen = torch.Generator().manual_seed(1)
    stats = {**_stats(gen), "held": torch.ones(L, E, dtype=torch.bool)}
    out = privatize(stats, 0.5, noise.generator(3, 0, noise.STATISTICS, 0), token_budget=640)
    assert torch.equal(out["held"], stats["held"])  # public: untouched
    assert torch.allclose(out["usage"].sum(-1), torch.ones(L)) and (out["usage"] >= 0).all()
    assert torch.allclose(out["tokens"].sum(-1), torch.full((L,), 640.0))
    assert out["signature"].shape == stats["signature"].shape
    # the noise on the bounded signature rows: std z * sqrt(4 noised statistics), per element
    draws = []
    for i in range(400):
        noised = privatize({"signature": stats["signature"]}, 0.5, noise.generator(3, i, noise.STATISTICS, 0), 1)
        draws.append((noised["signature"] / math.sqrt(L * E) - bounded("signature", stats["signature"])).flatten())
    assert torch.cat(draws).std().item() == pytest.approx(0.5, rel=0.02)  # one statistic: sqrt(1)
    with pytest.raises(ValueError, match="no declared bound"):
        privatize({"secret_sauce": torch.ones(3)}, 1.0, noise.generator(0, 0, 0), 1)


def test_the_accountant_is_the_librarys():
    mech = round_mechanism(100, 10, noise_multiplier=1.2, statistics_multiplier=2.0, count_noise=5.0)
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(0.6), dp_accounting.GaussianDpEvent(1.0), dp_accounting.GaussianDpEvent(5.0)])),
        30)
    assert epsilon(mech, 30, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # composing Gaussians = one Gaussian with 1/z^2 = sum 1/z_i^2 (the library composes them exactly)
    single = round_mechanism(100, 10, noise_multiplier=2 * (0.6 ** -2 + 1.0 ** -2 + 5.0 ** -2) ** -0.5)
    assert epsilon(single, 30, 1e-5) == pytest.approx(epsilon(mech, 30, 1e-5), rel=1e-9)
    plain = round_mechanism(100, 10, 1.2)
    assert epsilon(plain, 30, 1e-5) < epsilon(mech, 30, 1e-5)  # statistics cost budget
    assert epsilon(plain, 10, 1e-5) < epsilon(plain, 30, 1e-5)
    assert epsilon(round_mechanism(100, 5, 1.2), 30, 1e-5) < epsilon(plain, 30, 1e-5)  # amplification
    assert epsilon(round_mechanism(100, 10, 0.0), 1, 1e-5) == float("inf")


def test_config_refuses_a_false_statement():
    base = ["privacy.enabled=true", "fed.num_clients=10", "fed.clients_per_round=5"]
    with pytest.raises(ConfigError, match="accept_clear_statistics"):
        load_config(None, base + ["strategy.name=fedalign", "privacy.statistics_noise_multiplier=null"])
    cfg = load_config(None, base + ["strategy.name=fedalign", "privacy.statistics_noise_multiplier=null",
                                    "privacy.accept_clear_statistics=true"])
    assert cfg.privacy.accept_clear_statistics
    load_config(None, base + ["strategy.name=fedavg", "privacy.statistics_noise_multiplier=null"])  # shares none
    with pytest.raises(ConfigError, match="mode=pairwise"):
        load_config(None, base + ["strategy.name=fedalign", "strategy.fedalign.comm=allgather",
                                  "strategy.fedalign.mode=pairwise"])
    with pytest.raises(ConfigError, match="privacy.delta"):
        load_config(None, base + ["privacy.delta=0.2"])


def test_clear_statistics_are_left_out_of_epsilon_and_said_so(layout):
    _, strategy, dp = _setup(layout, "fedalign", "privacy.statistics_noise_multiplier=null",
                             "privacy.accept_clear_statistics=true")
    assert dp.mechanism.multipliers == (0.5,)
    assert dp.summary(3, False)["privacy"]["covers"].startswith("no guarantee")
    _, _, counted = _setup(layout, "fedalign")
    assert counted.mechanism.multipliers == (0.5, 0.5) and counted.epsilon(3) > dp.epsilon(3)


def test_guard_rejection_by_size_is_refused_and_fedamole_counts_no_amplification(layout):
    with pytest.raises(ConfigError, match="on_large_update=reject"):
        load_config(None, DP + ["guard.max_update_norm=5"])
    load_config(None, DP + ["guard.max_update_norm=5", "guard.on_large_update=clip"])
    cfg = load_config(None, DP + ["strategy.name=fedamole", "model.family=llama", "fed.num_clients=8",
                                  "fed.clients_per_round=4", "strategy.fedamole.num_experts=8"])
    from fedalign_dist.strategies import strategy_class
    amole = ClientLevelDP(cfg, strategy_class("fedamole").__new__(strategy_class("fedamole")), 1)
    assert amole.mechanism.clients_per_round == 8  # the model shows which experts' holders were sampled
    _, _, fedavg = _setup(layout, "fedavg", "fed.num_clients=8", "fed.clients_per_round=4")
    assert fedavg.mechanism.clients_per_round == 4 and fedavg.epsilon(5) < amole.epsilon(5)


def test_resume_refuses_other_accounting(layout):
    _, _, dp = _setup(layout, "fedavg")
    state = dp.state_dict()
    _, _, other = _setup(layout, "fedavg", "privacy.noise_multiplier=2")
    with pytest.raises(ValueError, match="accounted with"):
        other.load_state_dict(state)
    _, _, same = _setup(layout, "fedavg", "privacy.noise_seed=99")
    same.load_state_dict(state)
    assert same.secret == dp.secret and same.clip_norm == dp.clip_norm


def test_a_target_below_one_rounds_epsilon_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="below the epsilon of a single round"):
        load_config(None, DP + ["privacy.target_epsilon=0.5"])
    load_config(None, DP + ["privacy.target_epsilon=0.5", "strategy.name=local"])  # nothing leaves a client


def test_config_show_documents_the_count_noise_the_code_uses():
    from fedalign_dist.config_docs import describe_config
    from fedalign_dist.privacy.mechanism import count_noise
    cfg = load_config("configs/demo.yaml", [*DP, "privacy.adaptive_clip=true", "privacy.noise_multiplier=1.5"])
    assert count_noise(cfg) == max(cfg.fed.clients_per_round / 20, 2 * 1.5) == 3.0  # 2z, not K/20 = 0.2
    assert "None: max(fed.clients_per_round / 20, 2 * privacy.noise_multiplier)" in describe_config(cfg)

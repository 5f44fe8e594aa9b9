"""Client-level DP in the round loop (privacy.enabled): what a client's rank does to its
update and statistics before anything leaves it, the noise on the aggregate, the adaptive
clip bound and the accountant's epsilon. Every rank holds the same state (the secret, C)."""
from __future__ import annotations

import math
import secrets

import torch

from fedalign_dist.privacy import noise
from fedalign_dist.privacy.accountant import RoundMechanism, epsilon, round_mechanism
from fedalign_dist.privacy.clipping import clip_update, next_clip_norm
from fedalign_dist.privacy.statistics import privatize


def count_noise(cfg) -> float:
    """Std of the adaptive clip count's noise: privacy.count_noise_multiplier, else max(K/20, 2z)."""
    p = cfg.privacy
    return (p.count_noise_multiplier if p.count_noise_multiplier is not None
            else max(cfg.fed.clients_per_round / 20, 2 * p.noise_multiplier))


def accounted_mechanism(cfg, strategy_cls) -> RoundMechanism:
    """The round's mechanism as the accountant counts it, from the config and the strategy's
    class (what it shares, whether its model shows the sample)."""
    p = cfg.privacy
    counted_stats = strategy_cls.shares_statistics and p.statistics_noise_multiplier is not None
    sampled = cfg.fed.num_clients if strategy_cls.model_reveals_sample else cfg.fed.clients_per_round
    return round_mechanism(cfg.fed.num_clients, sampled, p.noise_multiplier,
                           p.statistics_noise_multiplier if counted_stats else None,
                           count_noise(cfg) if p.adaptive_clip else None)


class ClientLevelDP:
    def __init__(self, cfg, strategy, secret: int):
        self.cfg, self.p, self.strategy, self.secret = cfg, cfg.privacy, strategy, secret
        self.clip_norm = float(self.p.clip_norm)
        self.count_noise = count_noise(cfg)
        self.statistics_in_clear = strategy.shares_statistics and self.p.statistics_noise_multiplier is None
        self.counts_every_client = not self.statistics_in_clear
        """A non-finite client counts as a zero update (its statistics bounded), so the weights of
        the others never depend on whether it diverged; with statistics in the clear it is left out."""
        self.mechanism = accounted_mechanism(cfg, type(strategy))
        request = strategy.stats_request
        self.token_budget = (float(request.batches * cfg.local.batch_size * cfg.data.max_length * cfg.model.top_k)
                             if request is not None else 1.0)

    @classmethod
    def start(cls, cfg, strategy, side) -> "ClientLevelDP | None":
        """None unless privacy.enabled; the secret is privacy.noise_seed, else rank 0's draw."""
        if not cfg.privacy.enabled:
            return None
        mine = cfg.privacy.noise_seed if cfg.privacy.noise_seed is not None else secrets.randbits(62)
        return cls(cfg, strategy, int(side.all_gather_json(mine)[0]))

    # -- on the client's rank, before anything leaves it ---------------------------------
    def privatize_client(self, round_idx: int, client_id: int, delta: dict, stats: dict, norm: float | None = None):
        """(update clipped to C, statistics bounded and noised, whether the update was within C).
        The client counts as one example: its example count is private, so weights are uniform.
        `norm`: the whole update's, when `delta` is one shard of it (client groups)."""
        clipped, norm = clip_update(delta, self.clip_norm, norm)
        if self.strategy.shares_statistics and not self.statistics_in_clear and stats:
            gen = noise.generator(self.secret, round_idx, noise.STATISTICS, client_id)
            stats = privatize(stats, self.p.statistics_noise_multiplier, gen, self.token_budget)
        return clipped, stats, norm <= self.clip_norm

    # -- every rank, after the strategy's aggregate ---------------------------------------
    def noise_aggregate(self, round_idx: int, new_state: dict, comm) -> tuple[dict, dict]:
        """new_state + N(0, (z C w)^2), w = the largest client weight per parameter: one draw
        from the secret per tensor, the same on every rank (and for a shard of the state)."""
        if not self.strategy.shares_updates or self.p.noise_multiplier == 0:
            return new_state, {}
        largest = self.strategy.max_client_weight(new_state, comm)
        std = {name: self.p.noise_multiplier * self.clip_norm * (w.float() if torch.is_tensor(w) else w)
               for name, w in largest.items()}
        draw = noise.gaussian_like(new_state, std, lambda name: noise.tensor_generator(self.secret, round_idx, name))
        noised = {name: (t.float() + draw[name]).to(t.dtype) for name, t in new_state.items()}
        return noised, {"dp_noise_std_max": max((float(torch.as_tensor(s).max()) for s in std.values()), default=0.0)}

    def adapt_clip(self, round_idx: int, within: int, sampled: int, comm) -> dict:
        """The next round's C from the noised count of clients within C (summed over ranks)."""
        if not self.p.adaptive_clip:
            return {}
        count = float(comm.all_reduce_sum({"within": torch.tensor([float(within)])})["within"])
        gen = noise.generator(self.secret, round_idx, noise.COUNT)
        noised = count + float(torch.randn(1, generator=gen, dtype=torch.float64)) * self.count_noise
        used = self.clip_norm
        self.clip_norm = next_clip_norm(used, noised, sampled, self.p.target_quantile, self.p.clip_learning_rate)
        return {"dp_within_clip_fraction": noised / sampled if sampled else None}

    # -- accounting -----------------------------------------------------------------------
    def epsilon(self, rounds: int) -> float:
        if not self.strategy.shares_updates:
            return 0.0
        return epsilon(self.mechanism, rounds, self.p.delta)

    def would_exceed_target(self, rounds_done: int) -> bool:
        target = self.p.target_epsilon
        return target is not None and self.epsilon(rounds_done + 1) > target

    def record(self, rounds_done: int, clip_used: float) -> dict:
        eps = self.epsilon(rounds_done)
        return {"dp_epsilon": eps if math.isfinite(eps) else None, "dp_delta": self.p.delta, "dp_clip_norm": clip_used}

    def summary(self, rounds_done: int, stopped_at_target: bool) -> dict:
        eps = self.epsilon(rounds_done)
        covers = ("nothing leaves a client" if not self.strategy.shares_updates else
                  "no guarantee: statistics shared in the clear (privacy.accept_clear_statistics) set the "
                  "aggregation weights; epsilon is that of the update noise alone, as if the weights were public"
                  if self.statistics_in_clear else
                  "model updates and shared statistics" if self.strategy.shares_statistics else "model updates")
        return {"privacy": {"epsilon": eps if math.isfinite(eps) else None, "delta": self.p.delta,
                            "noise_multiplier": self.p.noise_multiplier,
                            "statistics_noise_multiplier": self.p.statistics_noise_multiplier,
                            "clip_norm_final": self.clip_norm, "adaptive_clip": self.p.adaptive_clip,
                            "covers": covers, "statistics_in_clear": self.statistics_in_clear,
                            "accountant": "dp-accounting RDP, replace-one, " + (
                                "no amplification (the model shows the sample)" if self.strategy.model_reveals_sample
                                else "sampling without replacement"),
                            "stopped_at_target_epsilon": stopped_at_target}}

    def state_dict(self) -> dict:
        """The secret (checkpoints are the operator's: whoever holds one can remove the noise),
        C, and the accounted mechanism, which a resumed run must keep."""
        m = self.mechanism
        return {"privacy.secret": str(self.secret), "privacy.clip_norm": self.clip_norm,
                "privacy.mechanism": [m.num_clients, m.clients_per_round, list(m.multipliers)]}

    def load_state_dict(self, state: dict) -> None:
        m = self.mechanism
        saved = state.get("privacy.mechanism")
        if saved != [m.num_clients, m.clients_per_round, list(m.multipliers)]:
            raise ValueError(f"the checkpoint's rounds were accounted with (clients, sampled, multipliers) = {saved}, "
                             f"this config gives {[m.num_clients, m.clients_per_round, list(m.multipliers)]}: epsilon "
                             f"would count the past rounds wrongly; resume with the privacy and fed settings it had")
        self.secret = int(state["privacy.secret"])
        self.clip_norm = float(state["privacy.clip_norm"])

"""Epsilon from Google's dp-accounting library (its RDP accountant), for the mechanism a
round runs: the round's clients sampled WITHOUT replacement, a fixed number K of N, the same
draw every rank makes (distributed/placement.py sample_clients), so the neighbouring relation is
REPLACE_ONE (one client's data replaced; N public). Each client then takes part in Gaussian
mechanisms whose multipliers are relative to the REPLACE_ONE sensitivity:
  model update   sum of updates clipped to C, noise std z C  -> sensitivity 2C: z / 2
  statistics     rows of norm <= sqrt(k), noise std z_s sqrt(k) -> 2 sqrt(k): z_s / 2
  clip count     count of bits, noise std sigma_b             -> 1: sigma_b
composed inside the sampled event (the library composes the Gaussians)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dp_accounting


def _library():
    # imported on first use: it pulls in scipy.signal and scipy.stats, ~2 s of every rank's
    # start-up, which a run without privacy.enabled never needs
    import dp_accounting
    return dp_accounting


@dataclass(frozen=True)
class RoundMechanism:
    num_clients: int
    clients_per_round: int
    multipliers: tuple[float, ...]
    """Gaussian noise multipliers relative to the REPLACE_ONE sensitivity."""

    def event(self) -> "dp_accounting.DpEvent":
        dp_accounting = _library()
        gaussians = [dp_accounting.GaussianDpEvent(m) for m in self.multipliers]
        inner = gaussians[0] if len(gaussians) == 1 else dp_accounting.ComposedDpEvent(gaussians)
        return dp_accounting.SampledWithoutReplacementDpEvent(self.num_clients, self.clients_per_round, inner)


def round_mechanism(num_clients: int, clients_per_round: int, noise_multiplier: float,
                    statistics_multiplier: float | None = None, count_noise: float | None = None) -> RoundMechanism:
    """The round's mechanism in the accountant's terms (None: that part is not released, or is
    released in the clear and not counted)."""
    parts = [noise_multiplier / 2]
    if statistics_multiplier is not None:
        parts.append(statistics_multiplier / 2)
    if count_noise is not None:
        parts.append(count_noise)
    return RoundMechanism(num_clients, clients_per_round, tuple(parts))


@lru_cache(maxsize=64)
def _one_round(mechanism: RoundMechanism):
    """(orders, RDP at each order) of one round, from the library's accountant (its compose is
    the expensive part: about 0.2 s)."""
    dp_accounting = _library()
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(mechanism.event(), 1)
    return accountant._orders, accountant._rdp


@lru_cache(maxsize=256)
def epsilon(mechanism: RoundMechanism, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` rounds of `mechanism` (inf where a multiplier is 0).
    RDP adds up over rounds (what the accountant's compose(event, rounds) does), so one round's
    RDP is computed once per run and the library converts rounds x that to epsilon."""
    if rounds <= 0:
        return 0.0
    if min(mechanism.multipliers) <= 0:
        return float("inf")
    orders, rdp = _one_round(mechanism)
    return float(_library().rdp.rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, delta)[0])

"""The premise diagnostic's mathematics (pure functions on tensors): do the clients of a
federation route differently, and do their same-numbered experts play the same roles?

Shapes: N clients, L MoE layers, E experts, D signature size. Inputs are the statistics
FedAlign-MoE uploads (clients/routing_stats.py): usage (N, L, E), tokens (N, L, E) and
output signatures (N, L, E, D), each client trained for one round from the same model.

Per layer, over every pair of clients (i, j):
  routing divergence   JS(u_i, u_j) (natural log, in [0, ln 2]): mean and max over pairs;
  role agreement       over the experts active on both, the share whose most similar
                       expert on the other client (cosine of centred signatures) has the
                       same number;
  matched similarity   the mean cosine of a maximum-weight matching of the two clients'
                       experts, against the mean cosine of same-numbered experts: a gap
                       (the matching gain) means a renumbering would line the experts up;
  any-pair similarity  the mean cosine of every expert of one client with every expert of
                       the other: the baseline. Only where matched partners are clearly more
                       alike than any two experts do experts have roles that carry from one
                       client to another (random or freshly upcycled experts do not).
Signatures are compared as the config's FedAlign-MoE compares them (centred only with
`center_signatures`). A low role agreement alone does not tell experts that a client
renumbered (matching can line them up) from experts that its data pulled elsewhere; the
gain of the matched over the same-numbered cosine does, where it is more than chance.

The matching gain is a maximum over noisy cosines, so it is positive by chance. Its null
comes from the same statistics: each draw deals every expert number's signatures (with
their active flags) to the clients in a random order, independently per number, and
measures the layer's mean matching gain again. In a draw every client's expert e is some
client's expert e, so nothing is renumbered by construction, while the noise and the drift
of each expert across clients are the measured ones; a renumbered client's experts are
dealt apart, so the gain they give is not in the null. p = (1 + draws gaining at least the
measured gain) / (1 + draws). The client effects the dealing breaks (a client's data moving
all its experts alike) only add noise to the draws, so the test errs towards "not
renumbered".
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedalign_dist.aggregation.alignment import js_divergence

AGREEMENT_THRESHOLD = 0.9
"""Below this role agreement a layer's experts differ between clients (diverged or permuted)."""
ROLE_CONTRAST_THRESHOLD = 0.2
"""Below this excess of the matched over the any-pair mean cosine, experts have no roles that
carry across clients. Measured (README): 0.05-0.13 on the random-initialised tiny Mixtral and
on the upcycled base, 0.29-0.46 on the pretrained base (unrelated random signatures of size
128 give about 0.1)."""
MATCH_GAIN_THRESHOLD = 0.03
"""Above this gain of the matched over the same-numbered mean cosine (in a layer whose experts
have roles), and beyond chance (CHANCE_P), its experts are renumbered between clients, which
matching corrects. Measured (README): 0.000-0.009 on the pretrained base at Dirichlet(0.1),
up to 0.043 after 110 local steps."""
CHANCE_P = 0.01
"""A matching gain counts as renumbering only if at most this share of its null's draws (see
the module's docstring) gain as much."""
NULL_DRAWS = 500
"""Draws of the matching gain's null per layer (seeded: the same statistics give the same p)."""
ROUTING_JS_THRESHOLD = 0.05
"""Above this mean pairwise routing JS a layer's gating preferences diverge."""


@dataclass
class LayerPremise:
    layer: int
    routing_js_mean: float
    routing_js_max: float
    role_agreement: float
    """Share of (pair, expert) whose nearest expert on the other client has its number."""
    same_number_similarity: float
    matched_similarity: float
    moved_share: float
    """Share of (pair, expert) that a maximum-weight matching renumbers."""
    any_pair_similarity: float
    pairs: int
    matching_gain_null_q99: float = math.nan
    """The 99th percentile of the matching gain over the null's draws (nothing renumbered)."""
    matching_gain_p: float = math.nan
    """Share of the null's draws (plus the measurement) that gain at least the measured matching
    gain: how likely chance alone gives this gain with numbers kept. nan: not drawn."""

    @property
    def role_contrast(self) -> float:
        return self.matched_similarity - self.any_pair_similarity

    @property
    def matching_gain(self) -> float:
        return self.matched_similarity - self.same_number_similarity


def matching(sim: torch.Tensor) -> torch.Tensor:
    """perm (a,): a maximum-weight matching of sim's rows to its columns (row r goes with
    column perm[r]; scipy's linear_sum_assignment), the identity where it is as good."""
    from scipy.optimize import linear_sum_assignment
    s = sim.detach().double().cpu().numpy()
    _, cols = linear_sum_assignment(s, maximize=True)
    best = float(s[np.arange(len(s)), cols].sum())
    if best > float(np.trace(s)) + 1e-9 * max(1.0, abs(best)):
        return torch.as_tensor(cols)
    return torch.arange(len(s))


def cosines(gram: torch.Tensor, active_NE: torch.Tensor, center: bool, order: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E, N, E) cosines [i, a, j, b] of client i's expert a with client j's b, and the (N, E)
    active flags, from the (N, E, N, E) dot products `gram` of the raw signatures. With `order`
    (N, E), client c's expert e is client order[c, e]'s expert e (a draw of the null); `center`
    subtracts each client's mean over its active experts first (centered_signatures)."""
    cos, active = _cosines(gram.double().cpu().numpy(), active_NE.bool().cpu().numpy(), center,
                           None if order is None else order.cpu().numpy())
    return torch.from_numpy(cos), torch.from_numpy(active)


def _cosines(gram: np.ndarray, active: np.ndarray, center: bool, order: np.ndarray | None) -> tuple[np.ndarray, ...]:
    # numpy: a draw's small gathers would wait on torch's threads (ms each under load)
    num, experts = active.shape
    e = np.arange(experts)
    if order is None:
        order = np.broadcast_to(np.arange(num)[:, None], (num, experts))
    slot = (order * experts + e).ravel()  # row of the flattened (N E, N E) gram
    k = gram.reshape(num * experts, num * experts)[np.ix_(slot, slot)].reshape(num, experts, num, experts)
    w = active[order, e].astype(np.float64)
    if center:
        count = np.maximum(w.sum(1), 1)  # (N,)
        row = np.einsum("ca,cadb->cdb", w, k) / count[:, None, None]  # client c's mean expert vs (d, b)
        col = np.einsum("db,cadb->cad", w, k) / count[None, None, :]
        both = np.einsum("ca,cadb,db->cd", w, k, w) / (count[:, None] * count[None, :])
        k = (k - row[:, None] - col[..., None] + both[:, None, :, None]) * (w[:, :, None, None] * w[None, None])
    norm = np.maximum(np.sqrt(np.maximum(np.einsum("caca->ca", k), 0)), 1e-12)
    return k / (norm[:, :, None, None] * norm[None, None]), w > 0


def _mean_matching_gain(cos: np.ndarray, active: np.ndarray) -> float:
    """The mean over pairs of the matched minus the same-numbered mean cosine (nan: no pair)."""
    from scipy.optimize import linear_sum_assignment
    gains = []
    everyone = bool(active.all())
    for i, j in itertools.combinations(range(active.shape[0]), 2):
        both = None if everyone else np.flatnonzero(active[i] & active[j])
        if both is not None and len(both) < 2:
            continue
        sim = cos[i, :, j, :] if both is None else cos[i, both][:, j, both]
        rows, cols = linear_sum_assignment(sim, maximize=True)
        gains.append(max(float(sim[rows, cols].sum() - np.trace(sim)), 0.0) / len(sim))
    return sum(gains) / len(gains) if gains else math.nan


def null_matching_gains(gram: torch.Tensor, active_NE: torch.Tensor, center: bool, draws: int = NULL_DRAWS,
                        seed: int = 0) -> torch.Tensor:
    """(draws,) the layer's mean matching gain with each expert number's signatures (and active
    flags) dealt to the clients in a random order, independently per number: numbers kept."""
    rng = np.random.default_rng(seed)
    gram_np, active_np = gram.double().cpu().numpy(), active_NE.bool().cpu().numpy()
    out = []
    for _ in range(draws):
        order = rng.random(active_np.shape).argsort(0)  # (N, E): per number, a client order
        out.append(_mean_matching_gain(*_cosines(gram_np, active_np, center, order)))
    return torch.tensor(out, dtype=torch.float64)


def layer_premise(layer: int, usage_NE: torch.Tensor, active_NE: torch.Tensor, signature_NED: torch.Tensor,
                  center: bool = False, null_draws: int = NULL_DRAWS) -> LayerPremise:
    """One layer's figures from the clients' usage, active experts and signatures."""
    sig, active_NE = signature_NED.detach().double().cpu(), active_NE.cpu()
    gram = torch.einsum("iad,jbd->iajb", sig, sig)
    cos, _ = cosines(gram, active_NE, center)
    js, agree, same, matched, any_pair, moved, counted = [], 0, [], [], [], 0, 0
    for i, j in itertools.combinations(range(usage_NE.shape[0]), 2):
        js.append(float(js_divergence(usage_NE[i].double(), usage_NE[j].double())))
        both = (active_NE[i] & active_NE[j]).nonzero().flatten()
        if len(both) < 2:
            continue
        sim = cos[i, both][:, j, both]  # [a, b]: client i's expert a vs client j's b
        agree += int((sim.argmax(1) == torch.arange(len(both))).sum())
        perm = matching(sim)
        same.append(float(sim.diagonal().mean()))
        any_pair.append(float(sim.mean()))
        matched.append(float(sim[torch.arange(len(both)), perm].mean()))
        moved += int((perm != torch.arange(len(both))).sum())
        counted += len(both)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    row = LayerPremise(layer, mean(js), max(js, default=float("nan")), agree / counted if counted else float("nan"),
                       mean(same), mean(matched), moved / counted if counted else float("nan"), mean(any_pair),
                       len(same))
    if null_draws and same:
        null = null_matching_gains(gram, active_NE, center, null_draws, seed=layer)
        null = null[~null.isnan()]
        # a draw gains "as much" within rounding of the measured gain (ties at 0 count)
        reach = int((null >= row.matching_gain - 1e-9).sum())
        row.matching_gain_null_q99 = float(torch.quantile(null, 0.99)) if len(null) else math.nan
        row.matching_gain_p = (1 + reach) / (1 + len(null))
    return row


def premise(layers: list[int], usage: torch.Tensor, tokens: torch.Tensor, signature: torch.Tensor,
            min_tokens: float = 1, center: bool = False, null_draws: int = NULL_DRAWS) -> list[LayerPremise]:
    active = tokens >= min_tokens
    return [layer_premise(layer, usage[:, li], active[:, li], signature[:, li], center, null_draws)
            for li, layer in enumerate(layers)]


def verdict(rows: list[LayerPremise]) -> str:
    """One line: whether alignment has anything to correct in this federation, and how."""
    roleless = [r for r in rows if r.role_contrast < ROLE_CONTRAST_THRESHOLD]
    gaining = [r for r in rows if r not in roleless and r.matching_gain > MATCH_GAIN_THRESHOLD]
    permuted = [r for r in gaining if r.matching_gain_p <= CHANCE_P]
    chance = [r for r in gaining if r not in permuted]
    diverged = [r for r in rows if r not in roleless and r not in permuted and r.role_agreement < AGREEMENT_THRESHOLD]
    parts = []
    if roleless:
        parts.append(f"experts have no roles that carry across clients in layer(s) {_layers(roleless)} (matched "
                     f"experts are less than {ROLE_CONTRAST_THRESHOLD} cosine more alike than any two): nothing stable "
                     f"to align or match; averaging mixes experts that play no common part")
    if permuted:
        share = sum(r.moved_share for r in permuted) / len(permuted)
        parts.append(f"{share:.0%} of expert pairs are renumbered between clients in layer(s) {_layers(permuted)} "
                     f"(a matching raises their cosine by {_gains(permuted)}, more than {MATCH_GAIN_THRESHOLD} and "
                     f"more than chance gives with numbers kept: p = {_ps(permuted)}, at most {CHANCE_P}; "
                     f"{_q99(permuted)}): alignment can pay, matching first (strategy.fedalign.match=true)")
    if diverged:
        parts.append(f"experts keep their roles and numbers but differ between clients in layer(s) "
                     f"{_layers(diverged)} (role agreement below {AGREEMENT_THRESHOLD:.0%}, nothing for a matching to "
                     f"gain beyond chance): FedAlign-MoE may keep some as personal experts")
    if not parts:
        parts.append(f"experts agree in every layer (role agreement at least {AGREEMENT_THRESHOLD:.0%}, nothing "
                     f"renumbered): FedAlign-MoE will average the experts as FedAvg does")
    if chance:
        parts.append(f"a matching's gain of {_gains(chance)} in layer(s) {_layers(chance)} is what chance gives with "
                     f"numbers kept (p = {_ps(chance)}, above {CHANCE_P}; {_q99(chance)}): not renumbered")
    routing = [r for r in rows if r.routing_js_mean > ROUTING_JS_THRESHOLD]
    top = max((r.routing_js_mean for r in rows), default=0.0)
    parts.append(
        f"gating preferences diverge in layer(s) {_layers(routing)} (mean routing JS above {ROUTING_JS_THRESHOLD})"
        if routing
        else f"gating preferences agree (mean routing JS at most {top:.3f})"
    )
    return "; ".join(parts)


def _layers(rows: list[LayerPremise]) -> str:
    return ", ".join(str(r.layer) for r in rows)


def _gains(rows: list[LayerPremise]) -> str:
    return ", ".join(f"{r.matching_gain:.3f}" for r in rows)


def _ps(rows: list[LayerPremise]) -> str:
    return ", ".join(f"{r.matching_gain_p:.3f}" for r in rows)


def _q99(rows: list[LayerPremise]) -> str:
    return f"the null's 99th percentile {', '.join(f'{r.matching_gain_null_q99:.3f}' for r in rows)}"


def as_json(rows: list[LayerPremise], line: str, meta: dict) -> dict:
    return {**meta, "verdict": line, "layers": [{**asdict(r), "role_contrast": r.role_contrast,
                                                 "matching_gain": r.matching_gain} for r in rows]}

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
                       means a renumbering would line the experts up;
  any-pair similarity  the mean cosine of every expert of one client with every expert of
                       the other: the baseline. Only where matched partners are clearly more
                       alike than any two experts do experts have roles that carry from one
                       client to another (random or freshly upcycled experts do not).
Signatures are compared as the config's FedAlign-MoE compares them (centred only with
`center_signatures`). A low role agreement alone does not tell experts that a client
renumbered (matching can line them up) from experts that its data pulled elsewhere; the
gain of the matched over the same-numbered cosine does.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

from fedalign_dist.aggregation.alignment import centered_signatures, js_divergence
from fedalign_dist.aggregation.matching import matching_permutation

AGREEMENT_THRESHOLD = 0.9
"""Below this role agreement a layer's experts differ between clients (diverged or permuted)."""
ROLE_CONTRAST_THRESHOLD = 0.2
"""Below this excess of the matched over the any-pair mean cosine, experts have no roles that
carry across clients. Measured (README): 0.05-0.13 on the random-initialised tiny Mixtral and
on the upcycled base, 0.29-0.46 on the pretrained base (unrelated random signatures of size
128 give about 0.1)."""
MATCH_GAIN_THRESHOLD = 0.03
"""Above this gain of the matched over the same-numbered mean cosine (in a layer whose experts
have roles), its experts are renumbered between clients, which matching corrects. Measured
(README): 0.000-0.009 on the pretrained base at Dirichlet(0.1), up to 0.043 after 110 local
steps."""
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

    @property
    def role_contrast(self) -> float:
        return self.matched_similarity - self.any_pair_similarity


def layer_premise(layer: int, usage_NE: torch.Tensor, active_NE: torch.Tensor, unit_NED: torch.Tensor) -> LayerPremise:
    """One layer's figures from the clients' usage, active experts and unit signatures."""
    js, agree, same, matched, any_pair, moved, counted = [], 0, [], [], [], 0, 0
    for i, j in itertools.combinations(range(usage_NE.shape[0]), 2):
        js.append(float(js_divergence(usage_NE[i].double(), usage_NE[j].double())))
        both = (active_NE[i] & active_NE[j]).nonzero().flatten()
        if len(both) < 2:
            continue
        sim = unit_NED[i, both] @ unit_NED[j, both].T  # [a, b]: client i's expert a vs client j's b
        agree += int((sim.argmax(1) == torch.arange(len(both))).sum())
        perm = matching_permutation(sim)
        same.append(float(sim.diagonal().mean()))
        any_pair.append(float(sim.mean()))
        matched.append(float(sim[torch.arange(len(both)), perm].mean()))
        moved += int((perm != torch.arange(len(both))).sum())
        counted += len(both)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return LayerPremise(layer, mean(js), max(js, default=float("nan")), agree / counted if counted else float("nan"),
                        mean(same), mean(matched), moved / counted if counted else float("nan"), mean(any_pair),
                        len(same))


def premise(layers: list[int], usage: torch.Tensor, tokens: torch.Tensor, signature: torch.Tensor,
            min_tokens: float = 1, center: bool = False) -> list[LayerPremise]:
    active = tokens >= min_tokens
    signature = centered_signatures(signature.double(), active) if center else signature.double()
    unit = torch.nn.functional.normalize(signature, dim=-1)
    return [layer_premise(layer, usage[:, li], active[:, li], unit[:, li]) for li, layer in enumerate(layers)]


def verdict(rows: list[LayerPremise]) -> str:
    """One line: whether alignment has anything to correct in this federation, and how."""
    roleless = [r for r in rows if r.role_contrast < ROLE_CONTRAST_THRESHOLD]
    permuted = [r for r in rows if r not in roleless
                and r.matched_similarity - r.same_number_similarity > MATCH_GAIN_THRESHOLD]
    diverged = [r for r in rows if r not in roleless and r not in permuted and r.role_agreement < AGREEMENT_THRESHOLD]
    parts = []
    if roleless:
        parts.append(f"experts have no roles that carry across clients in layer(s) {_layers(roleless)} (matched "
                     f"experts are less than {ROLE_CONTRAST_THRESHOLD} cosine more alike than any two): nothing stable "
                     f"to align or match; averaging mixes experts that play no common part")
    if permuted:
        share = sum(r.moved_share for r in permuted) / len(permuted)
        parts.append(f"{share:.0%} of expert pairs are renumbered between clients in layer(s) {_layers(permuted)} "
                     f"(a matching raises their cosine by more than {MATCH_GAIN_THRESHOLD}): alignment can pay, "
                     f"matching first (strategy.fedalign.match=true)")
    if diverged:
        parts.append(f"experts keep their roles and numbers but differ between clients in layer(s) "
                     f"{_layers(diverged)} (role agreement below {AGREEMENT_THRESHOLD:.0%}, nothing for a matching to "
                     f"gain): FedAlign-MoE may keep some as personal experts")
    if not parts:
        parts.append(f"experts agree in every layer (role agreement at least {AGREEMENT_THRESHOLD:.0%}, nothing "
                     f"renumbered): FedAlign-MoE will average the experts as FedAvg does")
    routing = [r for r in rows if r.routing_js_mean > ROUTING_JS_THRESHOLD]
    top = max((r.routing_js_mean for r in rows), default=0.0)
    parts.append(f"gating preferences diverge in layer(s) {_layers(routing)} (mean routing JS above "
                 f"{ROUTING_JS_THRESHOLD})" if routing else f"gating preferences agree (mean routing JS at most {top:.3f})")
    return "; ".join(parts)


def _layers(rows: list[LayerPremise]) -> str:
    return ", ".join(str(r.layer) for r in rows)


def as_json(rows: list[LayerPremise], line: str, meta: dict) -> dict:
    return {**meta, "verdict": line, "layers": [{**asdict(r), "role_contrast": r.role_contrast} for r in rows]}

"""Reverse selection expert assignment (FedAMoLE), one adapted layer at a time: each expert
ranks the clients (softmax over clients of e_i . t_c / sqrt(r)), and a 0/1 assignment X
maximises sum P[i, c] X[i, c] with every expert held by exactly `beta` clients and every
client holding between `min_experts` and `max_experts` experts.

The constraint matrix is that of a bipartite degree-constrained subgraph (totally
unimodular), so HiGHS (through scipy.optimize.milp) returns an integral optimum fast.
"""
from __future__ import annotations

import numpy as np
import torch


class InfeasibleAssignment(ValueError):
    pass


def check_feasible(num_experts: int, num_clients: int, beta: int, max_experts: int, min_experts: int = 2) -> None:
    """min_experts * N <= E * beta <= N * M, and beta <= N."""
    total = num_experts * beta
    if not (min_experts * num_clients <= total <= max_experts * num_clients) or beta > num_clients:
        raise InfeasibleAssignment(
            f"FedAMoLE assignment is infeasible: it needs {min_experts} x clients <= experts x expert_choices "
            f"<= max_experts x clients and expert_choices <= clients, but clients={num_clients}, "
            f"experts={num_experts}, expert_choices={beta}, max_experts={max_experts} "
            f"({min_experts * num_clients} <= {total} <= {max_experts * num_clients} fails): raise "
            f"strategy.fedamole.num_experts or expert_choices, or lower fed.num_clients")


def selection_scores(expert_emb: torch.Tensor, client_emb: torch.Tensor) -> torch.Tensor:
    """P[i, c] = softmax over clients of e_i . t_c / sqrt(r): (E, N)."""
    rank = expert_emb.shape[-1]
    return torch.softmax(expert_emb.double() @ client_emb.double().T / rank ** 0.5, dim=1)


def solve_assignment(scores: np.ndarray, beta: int, max_experts: int, min_experts: int = 2) -> np.ndarray:
    """0/1 (E, N) maximising sum scores * X under the degree constraints."""
    # imported here: scipy costs every rank ~40 MB, and only FedAMoLE's coordinator solves
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array, identity, kron
    num_experts, num_clients = scores.shape
    check_feasible(num_experts, num_clients, beta, max_experts, min_experts)
    # x is X flattened row-major: x[i * N + c]
    per_expert = kron(identity(num_experts, format="csr"), csr_array(np.ones((1, num_clients))))
    per_client = kron(csr_array(np.ones((1, num_experts))), identity(num_clients, format="csr"))
    constraints = [LinearConstraint(per_expert, beta, beta),
                   LinearConstraint(per_client, min_experts, max_experts)]
    result = milp(-np.asarray(scores, dtype=np.float64).ravel(), constraints=constraints,
                  integrality=np.ones(scores.size), bounds=Bounds(0, 1))
    if result.x is None:
        raise InfeasibleAssignment(f"HiGHS found no assignment: {result.message}")
    return np.round(result.x).reshape(num_experts, num_clients).astype(bool)


def random_assignment(num_experts: int, num_clients: int, beta: int, max_experts: int, seed: int,
                      min_experts: int = 2) -> np.ndarray:
    """The first round's assignment: the same solver on seeded random scores."""
    scores = np.random.default_rng([seed, 0xA5E1]).random((num_experts, num_clients))
    return solve_assignment(scores, beta, max_experts, min_experts)

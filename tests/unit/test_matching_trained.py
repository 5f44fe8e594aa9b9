"""Alignment by matching on clients that really train (issue 42, item 3): a real tiny Mixtral,
trained with its own loss (the router's load-balancing loss at its default weight), one
client starting from a permuted copy of the global model (the same function: its experts and
router rows renumbered). Matching must undo the permutation: the aggregate ends where the same
federation ends without the permutation, where FedAvg blurs the permuted experts into each
other. The client is matched against the global model it started from, so two clients are
enough. Run with -s to see the three distances."""
import pytest
import torch

from fedalign_dist.aggregation.matching import permute_experts
from fedalign_dist.clients.context import ClientContext
from fedalign_dist.clients.state import MemoryClientStore
from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.distributed.communicator import Communicator
from fedalign_dist.models.build import build_model
from fedalign_dist.strategies import ClientUpdate, build_strategy
from fedalign_dist.strategies.expertwise import PERSONAL_KEY

E = 4
BASE = ["model.family=mixtral", f"model.num_experts={E}", "data.max_length=32"]
COMM = Communicator(0, 1, torch.device("cpu"))
# the permuted client's model: new expert i = the global expert PERM[layer][i] (every expert moves).
# The same in every layer: the function is the same under any renumbering per layer, but
# transformers' Mixtral load-balancing loss sums the routed counts and probabilities of expert e
# over all layers before multiplying them, so it pairs expert e of every layer and is unchanged
# only when every layer is renumbered alike; otherwise the loss, and so the training, differ.
PERM = {0: torch.tensor([2, 0, 3, 1]), 1: torch.tensor([2, 0, 3, 1])}
STEPS, BATCH, LENGTH, LR = 4, 4, 24, 1e-3


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(None, BASE)
    model, anatomy = build_model(cfg, ByteTokenizer())
    global_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, anatomy, global_state


def _batches(client: int, count: int, seed: int = 0) -> list[dict]:
    """Non-IID token streams: client i draws from its own band of the byte vocabulary."""
    gen = torch.Generator().manual_seed(1000 * client + seed)
    low = 40 * client
    out = []
    for _ in range(count):
        ids = torch.randint(low, low + 90, (BATCH, LENGTH), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "position_ids": torch.arange(LENGTH).expand(BATCH, LENGTH).contiguous()})
    return out


def _strategy(anatomy, name: str, *overrides):
    cfg = load_config(None, [*BASE, f"strategy.name={name}", *overrides])
    return build_strategy(cfg, anatomy, MemoryClientStore())


def _train_client(tiny, strategy, client: int, permuted: bool) -> ClientUpdate:
    """One client's round through the strategy's client-side phases; `permuted`: after it
    received the global model, its model is replaced by the permuted copy (the same function),
    as if its experts had drifted into each other's roles."""
    model, anatomy, global_state = tiny
    start = strategy.client_start_state(client, global_state, strategy.store)
    model.load_state_dict(start, strict=False)
    strategy.prepare_client_model(model, client)
    if permuted:
        model.load_state_dict(permute_experts(start, anatomy, PERM), strict=False)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    for batch in _batches(client, STEPS):
        optimizer.zero_grad()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["input_ids"], output_router_logits=True)
        assert out.aux_loss is not None and model.config.router_aux_loss_coef > 0  # the model's own losses
        out.loss.backward()
        optimizer.step()
    delta = {n: p.detach() - global_state[n] for n, p in model.named_parameters() if p.requires_grad}
    stats = strategy.client_statistics(model, _context(client))
    return ClientUpdate(client, 20, delta, float(out.loss.detach()), stats)


def _context(client: int) -> ClientContext:
    return ClientContext(client, 0, None, torch.device("cpu"), ByteTokenizer().vocab_size, BATCH,
                         lambda n: iter(_batches(client, n, seed=1)))


def _federations(tiny, strategy, clients: int):
    """(permuted, unpermuted): the updates of a federation whose last client starts from the
    permuted copy, and of the same federation without the permutation."""
    honest = [_train_client(tiny, strategy, c, permuted=False) for c in range(clients - 1)]
    twin = _train_client(tiny, strategy, clients - 1, permuted=False)
    moved = _train_client(tiny, strategy, clients - 1, permuted=True)
    return honest + [moved], honest + [twin]


def _relative(anatomy, a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every expert tensor and router row of every MoE layer."""
    names = anatomy.names_of("expert", "router", among=b)
    diff = sum(float((a[n] - b[n]).pow(2).sum()) for n in names)
    return (diff / sum(float(b[n].pow(2).sum()) for n in names)) ** 0.5


def test_the_permuted_copy_computes_the_same_function(tiny):
    model, anatomy, global_state = tiny
    ids = _batches(0, 1)[0]["input_ids"]
    model.eval()
    with torch.no_grad():
        model.load_state_dict(global_state, strict=False)
        before = model(input_ids=ids).logits
        model.load_state_dict(permute_experts(global_state, anatomy, PERM), strict=False)
        after = model(input_ids=ids).logits
    model.load_state_dict(global_state, strict=False)
    assert float((after - before).abs().max()) <= 1e-6


@pytest.mark.parametrize("signature", ["probe", "output"])
def test_matching_undoes_a_client_that_starts_from_a_permuted_copy(tiny, signature):
    """The aggregate with matching on ends where the unpermuted federation's does (each method
    against itself on the unpermuted federation); the permuted client's experts are renumbered
    and nobody else's. Moving the client's changes instead of its parameters left it as far
    as FedAvg (0.353 against 0.355 with probe signatures)."""
    _, anatomy, global_state = tiny
    clients, knobs = 4, [f"strategy.fedalign.signature={signature}"]
    match = _strategy(anatomy, "fedalign", "strategy.fedalign.match=true", *knobs)
    permuted, unpermuted = _federations(tiny, match, clients)
    distance, diag = {}, {}
    for label, name, overrides in [("matching on", "fedalign", ["strategy.fedalign.match=true", *knobs]),
                                   ("matching off", "fedalign", knobs), ("FedAvg", "fedavg", [])]:
        together, diag[label] = _strategy(anatomy, name, *overrides).aggregate(global_state, permuted, COMM)
        reference, _ = _strategy(anatomy, name, *overrides).aggregate(global_state, unpermuted, COMM)
        distance[label] = _relative(anatomy, together, reference)
    print(f"\n{signature} signatures: permuted client, relative distance of the aggregated experts and router "
          f"rows to the unpermuted federation's: " + ", ".join(f"{k} {v:.2e}" for k, v in distance.items()))
    assert distance["matching on"] <= 1e-3, distance
    assert distance["FedAvg"] > 0.1, distance  # about sqrt(2) / clients: the experts blurred into each other
    assert distance["matching on"] < distance["matching off"], distance
    moved = {str(c): (2 * E if c == clients - 1 else 0) for c in range(clients)}
    assert diag["matching on"]["experts_moved_per_client"] == moved


def test_two_clients_are_enough(tiny):
    """Matching against the global model, not the clients' centroid: with two clients the
    centroid is halfway between the two numberings and tells them apart from neither."""
    _, anatomy, global_state = tiny
    match = _strategy(anatomy, "fedalign", "strategy.fedalign.match=true", "strategy.fedalign.signature=probe")
    permuted, unpermuted = _federations(tiny, match, 2)
    together, diag = match.aggregate(global_state, permuted, COMM)
    reference, ref_diag = _strategy(anatomy, "fedalign", "strategy.fedalign.match=true",
                                    "strategy.fedalign.signature=probe").aggregate(global_state, unpermuted, COMM)
    print(f"\ntwo clients: experts moved {diag['experts_moved_per_client']}, relative distance "
          f"{_relative(anatomy, together, reference):.2e}")
    assert diag["experts_moved_per_client"] == {"0": 0, "1": 2 * E}
    assert ref_diag["experts_moved"] == 0
    assert _relative(anatomy, together, reference) <= 1e-3
    fedavg, _ = _strategy(anatomy, "fedavg").aggregate(global_state, permuted, COMM)
    assert _relative(anatomy, fedavg, _strategy(anatomy, "fedavg").aggregate(global_state, unpermuted, COMM)[0]) > 0.1


def test_the_reference_is_the_global_model_also_for_a_client_with_personal_experts(tiny):
    """A client whose start holds a personal expert (not the global one) still sends the global
    model's signatures, and trains from its own start: the personal slice is put back after
    the pass."""
    model, anatomy, global_state = tiny
    with_copy = _strategy(anatomy, "fedalign", "strategy.fedalign.match=true")
    name = anatomy.names_of("expert", among=global_state)[0]
    with_copy.store.put(1, PERSONAL_KEY, {f"{name}|2": anatomy.expert_slice(name, global_state[name], 2) + 0.5})
    start = with_copy.client_start_state(1, global_state, with_copy.store)
    assert not torch.equal(start[name], global_state[name])
    model.load_state_dict(start, strict=False)
    with_copy.prepare_client_model(model, 1)
    assert torch.equal(dict(model.named_parameters())[name].detach(), start[name])
    sent = with_copy.client_statistics(model, _context(1))["match_reference"]
    plain = _strategy(anatomy, "fedalign", "strategy.fedalign.match=true")
    model.load_state_dict(plain.client_start_state(0, global_state, plain.store), strict=False)
    plain.prepare_client_model(model, 0)
    assert torch.equal(plain.client_statistics(model, _context(0))["match_reference"], sent)
    model.load_state_dict(global_state, strict=False)

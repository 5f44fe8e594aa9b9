"""The premise of bench/permuted_client_report.py: a client whose experts 0 and 1 (weights and
router rows) are exchanged computes the same function as the original model, so the only
thing wrong with its update is the numbering."""
import importlib.util

import torch

from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.models.build import build_model
from tests.conftest import REPO


def _report():
    spec = importlib.util.spec_from_file_location("permuted_client_report", REPO / "bench/permuted_client_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_swapping_experts_with_their_router_rows_keeps_the_function():
    report = _report()
    cfg = load_config(None, ["model.family=mixtral", "model.num_experts=4", "data.max_length=32"])
    model, anatomy = build_model(cfg, ByteTokenizer())
    model.eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    swapped = report.swapped(state, anatomy)
    changed = [n for n in state if not torch.equal(state[n], swapped[n])]
    assert changed and all(anatomy.role(n).kind in ("router", "expert") for n in changed)
    model.load_state_dict(swapped, strict=False)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    # swapping the experts without their router rows is a different function
    rows_kept = {n: (state[n] if anatomy.role(n).kind == "router" else t) for n, t in swapped.items()}
    model.load_state_dict(rows_kept, strict=False)
    assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)

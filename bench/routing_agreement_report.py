"""Does each family's routing statistic describe the routing the model performs? For every
family's tiny preset, and for a grouped DeepSeek-V3 (8 experts in 4 groups, 2 kept) whose
correction bias changes the choice, the share of tokens whose top-k under the project's
distribution is the model's own top-k, next to the old statistic (softmax of the logits).

    python bench/routing_agreement_report.py      # ~20 s on 2 cores
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedalign_dist.config import load_config  # noqa: E402
from fedalign_dist.data.tokenizer import ByteTokenizer  # noqa: E402
from fedalign_dist.models.build import build_model  # noqa: E402
from fedalign_dist.models.families import FAMILIES, family_of  # noqa: E402
from fedalign_dist.models.router_tap import RouterTap  # noqa: E402
from tests.unit.test_routing_distribution import _deepseek  # noqa: E402  (the grouped, biased model)


def agreement(model, family, k=2) -> tuple[float, float, float, float]:
    """(softmax agreement, project agreement, |usage - load|_1 softmax, project), layer means."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (8, 32), generator=gen)
    rows = []
    with RouterTap(model, family) as tap, torch.no_grad():
        model(input_ids=ids)
        for layer in tap.layers:
            rec = tap.records[layer]
            chosen = rec.indices.sort(-1).values
            load = torch.bincount(rec.indices.flatten(), minlength=rec.logits.shape[-1]).float()
            load /= load.sum()
            out = []
            for probs in (torch.softmax(rec.logits.float(), -1), tap.routing_probs(layer)):
                out.append(float((probs.topk(k, -1).indices.sort(-1).values == chosen).all(-1).float().mean()))
            for probs in (torch.softmax(rec.logits.float(), -1), tap.routing_probs(layer)):
                out.append(float((probs.mean(0) - load).abs().sum()))
            rows.append(out)
    return tuple(sum(r[i] for r in rows) / len(rows) for i in range(4))


def main() -> None:
    print("| model | top-2 agree, softmax | top-2 agree, project | L1(usage, load), softmax | project |")
    print("|---|---|---|---|---|")
    for name in sorted(FAMILIES):
        cfg = load_config(None, [f"model.family={name}", "model.num_experts=8", "model.top_k=2",
                                 "data.max_length=32"])
        model, anatomy = build_model(cfg, ByteTokenizer())
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if anatomy.role(pname).kind == "router":
                    p.normal_(0, 0.5)
        print(f"| {name} (tiny preset) | " + " | ".join(f"{x:.3f}" for x in agreement(model, anatomy.family)) + " |")
    print("| deepseek_v3, 4 groups keep 2, biased | " +
          " | ".join(f"{x:.3f}" for x in agreement(_deepseek(), family_of("deepseek_v3"))) + " |")


if __name__ == "__main__":
    main()

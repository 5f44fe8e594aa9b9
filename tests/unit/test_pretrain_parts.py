"""The pretrained base's parts on hand-computed cases: the roles measures, token kinds, the
held-out split."""
import math

import pytest
import torch

from fedalign_dist.pretrain.corpus import split_documents
from fedalign_dist.pretrain.roles import entropy, normalised_information, token_kind


def test_information_is_zero_when_independent_and_one_when_routing_decides():
    independent = torch.tensor([[10.0, 30.0], [20.0, 60.0]])  # rows proportional
    assert normalised_information(independent) == pytest.approx(0.0, abs=1e-12)
    decided = torch.tensor([[5.0, 0.0, 0.0], [0.0, 7.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    assert normalised_information(decided) == pytest.approx(1.0, abs=1e-12)  # each kind has one expert
    # a hand-computed middle case: p(x, y) = [[.5, 0], [.25, .25]]; H(Y) = H(.75, .25)
    half = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    hy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    hx = math.log(2)
    hxy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert normalised_information(half) == pytest.approx((hx + hy - hxy) / hy, rel=1e-12)
    assert entropy(torch.tensor([0.25] * 4)) == pytest.approx(math.log(4))


def test_token_kinds_of_byte_level_pieces():
    assert [token_kind(p) for p in ("Ġthe", "ing", "Ġ2014", "42", ".", "Ġ,", "Ġ", "Ġe-mail", "Ã©")] == [
        0, 1, 2, 2, 3, 3, 4, 4, 4]


def test_heldout_split_is_seeded_by_text_disjoint_and_deduplicated():
    docs = [("a", f"document number {i}") for i in range(400)] + [("b", "document number 7")]
    first = split_documents(docs, 0.25, seed=0)
    again = split_documents(list(reversed(docs)), 0.25, seed=0)
    assert sorted(first.heldout) == sorted(again.heldout)  # the order of sources does not matter
    texts = [t for _, t in first.train] + [t for _, t in first.heldout]
    assert len(texts) == len(set(texts)) == 400
    assert 60 < len(first.heldout) < 140
    assert sorted(split_documents(docs, 0.25, seed=1).heldout) != sorted(first.heldout)

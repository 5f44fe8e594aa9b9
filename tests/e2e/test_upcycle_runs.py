"""Sparse upcycling end to end: SmolLM2-135M (shipped in a package) upcycled to 4 experts
keeps its perplexity, at tiny length on CPU; `fedalign-dist upcycle` writes a checkpoint that
a federated MoE run loads through model.path."""
import subprocess
import sys

import pytest
import torch

import fedalign_dist as fd
from fedalign_dist.data.tokenizer import build_tokenizer
from fedalign_dist.pretrain.upcycle import upcycle
from tests.conftest import REPO

TEXT = ("The capital of France is Paris. It lies on the Seine, and about two million people live in the city "
        "itself, more than twelve million in its region.")


@pytest.mark.slow  # SmolLM2-135M and its 373M-parameter MoE
def test_smollm2_upcycled_to_four_experts_keeps_its_perplexity(smollm2):
    dense, tokenizer = smollm2
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        expected = dense(input_ids=ids, labels=ids)
        moe = upcycle(dense, experts=4, top_k=2).eval()
        got = moe(input_ids=ids, labels=ids)
    assert moe.config.num_local_experts == 4 and sum(p.numel() for p in moe.parameters()) > 3e8
    assert torch.exp(got.loss) == pytest.approx(float(torch.exp(expected.loss)), rel=1e-5)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_upcycle_command_writes_a_model_path_for_moe_runs(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    gpt2 = build_tokenizer("gpt2").tok
    dense_dir = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(gpt2), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 bos_token_id=gpt2.eos_token_id, eos_token_id=gpt2.eos_token_id)
                     ).save_pretrained(str(dense_dir))
    out = tmp_path / "moe"
    command = [sys.executable, "-m", "fedalign_dist", "upcycle", "--dense", str(dense_dir), "--experts", "4", "--out",
               str(out)]
    # without a tokenizer: one line, and nothing written that would block the rerun
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"fedalign-dist: error: --dense {dense_dir} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json or "
        f"tokenizer_config.json): the upcycled checkpoint carries the dense model's; save it into that folder first "
        f"(tokenizer.save_pretrained)"], refused.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
    gpt2.save_pretrained(str(dense_dir))
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe"]  # no temporary sibling left
    records = fd.run(fd.load_config("configs/demo.yaml", [
        f"run.output_dir={tmp_path}", "run.name=upcycled", f"model.path={out}", "data.tokenizer=model",
        "data.max_examples=200", "data.max_length=64", "data.min_client_examples=5", "fed.num_clients=4",
        "fed.clients_per_round=4", "fed.rounds=1", "local.steps=2", "local.batch_size=4", "eval.batch_size=64"]))
    assert records[-1]["aligned_fraction"] is not None and records[-1]["global_accuracy"] is not None
    again = subprocess.run([sys.executable, "-m", "fedalign_dist", "upcycle", "--dense", str(dense_dir), "--out",
                            str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr

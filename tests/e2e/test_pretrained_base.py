"""The small MoE base: `fedalign-dist pretrain` end to end (a few steps), and the committed
checkpoint: it loads as model.path=package:public-moe-8x2 with its own tokenizer, its
held-out perplexity is the one its card states, its experts have roles, and a federated run
fine-tunes it."""
import json
import subprocess
import sys

import pytest

import fedalign_dist as fd
from fedalign_dist.models.packaged import resolve
from tests.conftest import REPO

BASE = "package:public-moe-8x2"
DENSE = "package:public-dense"  # FedAMoLE's base: same text and tokenizer, a dense MLP two experts wide


@pytest.mark.slow  # the whole pretraining text tokenised and scored (~30 s a base)
@pytest.mark.parametrize("dense", [False, True])
def test_pretrain_writes_a_checkpoint_with_its_tokenizer_and_card(tmp_path, dense):
    out = tmp_path / "base"
    flag = ["--dense"] if dense else []
    done = subprocess.run([sys.executable, "-m", "fedalign_dist", "pretrain", "--out", str(out), "--steps", "2", *flag],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "card.json"} <= {p.name for p in out.iterdir()}
    card = json.loads((out / "card.json").read_text())
    assert card["command"].endswith(f"pretrain --out {out} --steps 2{' --dense' if dense else ''}")
    assert card["tokens_seen"] == 2 * 16 * 128
    config = json.loads((out / "config.json").read_text())
    if dense:  # the MoE's compute per token: an MLP two experts wide; no experts, no roles
        assert config["model_type"] == "llama" and config["intermediate_size"] == 2 * 256
        assert card["roles"] is None
        return
    assert config["model_type"] == "mixtral" and card["roles"]["trained"]
    again = subprocess.run([sys.executable, "-m", "fedalign_dist", "pretrain", "--out", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.fixture(scope="module")
def card():
    folder, _ = resolve(BASE)
    return json.loads((folder / "card.json").read_text())


@pytest.mark.parametrize("base", [BASE, DENSE])
def test_the_committed_base_has_the_perplexity_its_card_states(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedalign_dist.pretrain.corpus import load_documents, split_documents
    from fedalign_dist.pretrain.train import pack, perplexity
    folder, _ = resolve(base)
    card = json.loads((folder / "card.json").read_text())
    assert sum(p.stat().st_size for p in folder.iterdir()) < 25e6
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    spec = card["spec"]
    text = split_documents(load_documents(), spec["heldout_fraction"], spec["seed"])
    rows, _, _ = pack(tokenizer, text.heldout, spec["seq_len"])
    assert rows.numel() == card["text"]["heldout_tokens"]
    assert perplexity(model, rows) == pytest.approx(card["heldout_perplexity"], rel=1e-4)
    assert card["heldout_perplexity"] < card["heldout_perplexity_at_init"] / 20


def test_the_committed_bases_experts_have_roles(card):
    trained, init = card["roles"]["trained"], card["roles"]["at_init"]
    assert all(layer["load_entropy"] > 0.7 for layer in trained)  # every expert in use, not uniformly
    # in every layer the top-1 expert says much more about the kind of token than at
    # initialisation; about the document's source it says a little more (routing by kind)
    assert all(t["kind_information"] > max(0.1, 3 * i["kind_information"]) for t, i in zip(trained, init))
    assert max(t["source_information"] for t in trained) > max(i["source_information"] for i in init)


def test_a_federated_run_fine_tunes_the_base(tmp_path):
    records = fd.run(fd.load_config("configs/demo.yaml", [
        f"run.output_dir={tmp_path}", "run.name=on_base", f"model.path={BASE}", "model.num_experts=8",
        "data.tokenizer=model",
        "data.max_examples=200", "data.max_length=64", "data.min_client_examples=5", "fed.num_clients=4",
        "fed.clients_per_round=4", "fed.rounds=2", "local.steps=2", "local.batch_size=4", "eval.batch_size=64"]))
    assert [r["round"] for r in records] == [0, 1]
    model = json.loads((tmp_path / "on_base/model.json").read_text())
    assert model["num_experts"] == 8 and records[-1]["global_accuracy"] is not None


def test_the_dense_base_shares_the_moe_bases_tokenizer_and_compute_per_token():
    """FedAMoLE's base is comparable: same vocabulary, same attention, an MLP as wide as the
    MoE's top-k experts together."""
    (moe, _), (dense, _) = resolve(BASE), resolve(DENSE)
    assert (moe / "tokenizer.json").read_bytes() == (dense / "tokenizer.json").read_bytes()
    m, d = (json.loads((f / "config.json").read_text()) for f in (moe, dense))
    assert d["intermediate_size"] == m["num_experts_per_tok"] * m["intermediate_size"]
    assert all(d[k] == m[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"))

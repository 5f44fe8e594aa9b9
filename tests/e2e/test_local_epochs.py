"""local.epochs: each client takes ceil(epochs x its examples / batch) steps, so a run with
epochs trains exactly as the same run with that client's step count written out."""
import pytest

import fedalign_dist as fd
from fedalign_dist.config import load_config
from fedalign_dist.data.federated import build_federated_data
from fedalign_dist.data.tokenizer import build_tokenizer
from fedalign_dist.distributed.placement import sample_clients


def test_steps_follow_each_clients_data():
    local = load_config("configs/demo.yaml", ["local.epochs=1.5", "local.batch_size=8"]).local
    assert [local.steps_for(n) for n in (1, 8, 9, 100)] == [1, 2, 2, 19]
    assert load_config("configs/demo.yaml", []).local.steps_for(100) == 20  # the demo's local.steps
    with pytest.raises(Exception, match="epochs"):
        load_config("configs/demo.yaml", ["local.epochs=0"])


def test_a_run_by_epochs_trains_as_its_steps_written_out(tmp_path, tiny_overrides, one_thread):
    overrides = tiny_overrides + ["fed.num_clients=4", "fed.clients_per_round=1", "fed.rounds=1",
                                  "strategy.name=fedavg"]
    by_epochs = fd.run(fd.load_config("configs/demo.yaml", overrides), "run.name=epochs", "local.epochs=0.5")
    cfg = fd.load_config("configs/demo.yaml", overrides)  # the one sampled client and its examples
    (client,) = sample_clients(cfg.seed, 0, 4, 1)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.model.path)
    n = build_federated_data(cfg.data, 4, cfg.seed, tokenizer).num_train(client)
    steps = -(-n // 8)  # ceil(0.5 * n / 4)
    assert steps != 3  # not TINY's local.steps, so a run that ignored epochs would differ
    by_steps = fd.run(fd.load_config("configs/demo.yaml", overrides), "run.name=steps", f"local.steps={steps}")
    assert by_epochs[0]["train_loss"] == by_steps[0]["train_loss"]
    assert by_epochs[0]["global_accuracy"] == by_steps[0]["global_accuracy"]

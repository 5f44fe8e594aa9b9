"""The 2-rank runs that end-to-end tests read, trained together by one job (the `batch`
fixture, tests/run_batch.py). Each entry names the test that reads it; a run that is only
read, never launched in its own way, belongs here instead of in a torchrun call of its own."""
from pathlib import Path

from tests.conftest import TINY

FOUR = ["fed.num_clients=4", "fed.clients_per_round=4"]
BETA0 = [
    "strategy.fedalign.beta=0",
    "strategy.fedalign.similarity_floor=1",
]  # some clients always keep personal experts
PERSONAL = ["strategy.name=fedalign", *BETA0, "strategy.fedalign.mode=pairwise", "strategy.fedalign.comm=allgather",
            "fed.client_state=disk", "fed.rounds=3", "checkpoint.every=1", "checkpoint.keep=3", "fed.num_clients=6",
            "fed.clients_per_round=4"]
GUARDED = {  # test_guard_runs: client 2 (on rank 1) diverges in every round
    "fedavg": ["strategy.name=fedavg"],
    "fedmoe": ["strategy.name=fedmoe"],
    "fedalign_reduce": ["strategy.name=fedalign", "strategy.fedalign.comm=reduce", *BETA0,
                        "strategy.fedalign.match=true"],  # matching behind the guard
    "fedalign_allgather": ["strategy.name=fedalign", "strategy.fedalign.comm=allgather",
                           "strategy.fedalign.mode=pairwise", *BETA0],
    "fedamole": ["strategy.name=fedamole", "model.family=llama", "strategy.fedamole.num_experts=6",
                 "strategy.fedamole.rank=4", "strategy.fedamole.max_experts=4"],
}
DP_FEDALIGN = ["strategy.name=fedalign", "fed.num_clients=8", "fed.clients_per_round=4", "fed.rounds=3",
               "privacy.enabled=true", "privacy.noise_seed=5", "privacy.delta=1e-3", "privacy.noise_multiplier=1.5",
               "privacy.statistics_noise_multiplier=2", "privacy.adaptive_clip=true",
               "strategy.fedalign.match=true"]  # matching reads the noised statistics
AMOLE = ["strategy.name=fedamole", "model.family=llama", *FOUR, "strategy.fedamole.num_experts=6",
         "strategy.fedamole.rank=4", "strategy.fedamole.max_experts=4", "checkpoint.every=1"]
PLACEMENT = ["fed.num_clients=6", "fed.clients_per_round=3", "fed.rounds=4"]
SPARSE = ["fed.rounds=4", "eval.every=5", "eval.personalized_every=5"]  # the defaults' cadence: only the last round
"""test_runs: the demo's FedAlign-MoE scored every round (TINY), at the default cadence, and at
the default cadence extended by resume from 2 rounds to 4: the same trained weights."""
KILLED = ["fed.rounds=4", "checkpoint.every=1", "run.resume=auto", *BETA0, "fed.num_clients=6",
          "strategy.fedalign.match=true"]
"""test_resilience: a run whose rank is killed and restarted, and its uninterrupted twin
(FedAlign-MoE with matching: a resumed run renumbers as the uninterrupted one did)."""


def dp_target_epsilon() -> float:
    """A target between the epsilon after 2 and after 3 rounds of DP_FEDALIGN: it allows 2."""
    from fedalign_dist.privacy.accountant import epsilon, round_mechanism
    mech = round_mechanism(8, 4, 1.5, 2.0, max(4 / 20, 2 * 1.5))  # the default count noise
    return (epsilon(mech, 2, 1e-3) + epsilon(mech, 3, 1e-3)) / 2


def olmoe_checkpoint(folder: Path) -> Path:
    """A user's own checkpoint for model.path (test_runs: local-only from model.path)."""
    from fedalign_dist.config import load_config
    from fedalign_dist.data.tokenizer import ByteTokenizer
    from fedalign_dist.models.build import build_base_model
    cfg = load_config("configs/demo.yaml", ["model.family=olmoe", "data.tokenizer=byte"])
    model, _, _ = build_base_model(cfg.model, ByteTokenizer(), cfg.data.max_length, 0)
    model.save_pretrained(folder)
    return folder


def articles_tsv(path: Path) -> Path:
    """248 real BBC articles, every topic, as `label<TAB>text` lines (test_plugin_run's data)."""
    from fedalign_dist.data.sources import load_bbc_news
    bbc = load_bbc_news()
    path.write_text("".join(f"{bbc.label_names[bbc.labels[i]]}\t{bbc.texts[i]}\n" for i in range(0, len(bbc.texts), 9)))
    return path


def shared_runs(inputs: Path) -> list[dict]:
    inputs.mkdir(parents=True, exist_ok=True)
    ckpt, tsv = olmoe_checkpoint(inputs / "olmoe"), articles_tsv(inputs / "articles.tsv")
    runs = [
        # test_runs
        {"name": "placement_two", "overrides": [*FOUR, "checkpoint.every=1"]},
        *({"name": f"placement_{strategy}_{how}", "overrides": [f"strategy.name={strategy}", *PLACEMENT] +
           (["fed.placement=blocks"] if how == "blocks" else [])}
          for strategy in ("local", "fedalign") for how in ("blocks", "balanced")),
        {"name": "lora_fedprox_zero2", "overrides": ["model.finetune=lora", "strategy.name=fedprox",
                                                     "deepspeed.zero_stage=2", "model.family=qwen3_moe"]},
        {"name": "local_model_path", "overrides": [f"model.path={ckpt}", "strategy.name=local", "data.tokenizer=byte",
                                                   "model.family=olmoe", "fed.client_state=disk"]},
        {"name": "cadence_every_round", "overrides": ["fed.rounds=4"]},
        {"name": "cadence_default", "overrides": SPARSE},
        {"name": "cadence_first_half", "overrides": [*SPARSE, "fed.rounds=2", "checkpoint.every=1"]},
        {"name": "cadence_extended", "overrides": [*SPARSE, "checkpoint.every=1", "run.resume=true"],
         "copy_from": "cadence_first_half"},
        # test_fedalign_runs
        *({"name": f"fedalign_{comm}", "overrides": ["strategy.name=fedalign", *FOUR, "checkpoint.every=1",
                                                     f"strategy.fedalign.comm={comm}", "strategy.fedalign.match=true"]}
          for comm in ("reduce", "allgather")),
        {"name": "personal_full", "overrides": PERSONAL},
        {"name": "personal_crashed", "overrides": [*PERSONAL, "run.resume=true"], "copy_from": "personal_full",
         "remove": ["checkpoints/round_00002", "final", "summary.json"]},  # what a crash in round 2 leaves
        # test_resilience: the uninterrupted run a killed and restarted one must equal
        {"name": "killed_clean", "overrides": KILLED},
        # test_guard_runs
        *({"name": f"guard_{method}", "overrides": [*overrides, *FOUR, "checkpoint.every=1", "fed.client_state=disk"],
           "fault": "diverge_client=2"} for method, overrides in GUARDED.items()),
        {"name": "guard_overflow", "overrides": ["strategy.name=fedavg", *FOUR], "fault": "huge_delta_client=2"},
        # test_privacy_runs
        {"name": "dp_fedalign", "overrides": [*DP_FEDALIGN, f"privacy.target_epsilon={dp_target_epsilon()}"]},
        # test_bf16_run
        {"name": "bf16", "overrides": ["deepspeed.bf16=true", "local.lr=1e-6", "checkpoint.every=1",
                                       "checkpoint.keep=2", *FOUR]},
        # test_fedamole_run
        {"name": "amole", "overrides": AMOLE},
        # test_plugin_run: the built-in FedAvg on the external source, against the external strategy
        {"name": "plugin_builtin", "overrides": [*FOUR, "imports=[tsv_source]", "data.name=tsv_lines",
                                                 f"data.tsv_lines.path={tsv}", "strategy.name=fedavg"]},
        # test_own_data_runs
        {"name": "headlines", "config": "configs/headlines.yaml",
         "overrides": ["data.max_length=80", "fed.rounds=3", "local.steps=8", "eval.global_examples=32",
                       "data.instruction.generate_fraction=0.2"]},
    ]
    for run in runs:
        run["overrides"] = [*TINY, *run["overrides"]]
    return runs

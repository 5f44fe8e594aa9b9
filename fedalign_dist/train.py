"""Per-rank entry point, started by torchrun, accelerate launch or srun:

    python -m fedalign_dist train --config configs/demo.yaml fed.rounds=3

Order matters: everything a user can get wrong in the configuration is checked before the
process group starts; the run folder is prepared by rank 0 right after it starts, so that a
refusal there ends every rank at once instead of leaving them waiting to connect."""
from __future__ import annotations

import logging
import os
import warnings

from fedalign_dist.config import Config, ConfigError, load_config
from fedalign_dist.config_sections import group_split_error


def preflight(cfg: Config, world_size: int, local_world_size: int | None = None) -> None:
    """Checks that need no process group: model path, world size against clients and nodes."""
    if cfg.model.path is not None:
        from fedalign_dist.models.build import check_model_path
        check_model_path(cfg.model.path)
    group = cfg.fed.ranks_per_client
    if group_split_error(world_size, group):
        raise ConfigError(group_split_error(world_size, group))
    check_groups_within_nodes(cfg, local_world_size)
    if world_size // group > cfg.fed.num_clients:
        hosts = "" if group == 1 else f" ({world_size // group} client groups of {group} ranks)"
        raise ConfigError(f"world size {world_size}{hosts} exceeds fed.num_clients ({cfg.fed.num_clients}): every "
                          f"{'rank' if group == 1 else 'group'} must host at least one client; start fewer processes "
                          f"or raise fed.num_clients")


def check_groups_within_nodes(cfg: Config, local_world_size: int | None) -> None:
    """Groups are consecutive ranks and launchers number ranks node by node, so a group stays
    on one node exactly when a node's rank count is a multiple of G. NCCL between nodes is
    what a group's every-step ZeRO-3 collectives must not silently pay; gloo runs are CPU tests."""
    group = cfg.fed.ranks_per_client
    if group == 1 or local_world_size is None or local_world_size % group == 0 or cfg.fed.groups_across_nodes:
        return
    from fedalign_dist.distributed.env import resolve_backend
    if resolve_backend(cfg.dist.backend) == "nccl":
        raise ConfigError(f"{local_world_size} ranks per node do not split into client groups of {group} "
                          f"(fed.ranks_per_client): a group would span nodes over NCCL; start a multiple of {group} "
                          f"processes per node, or set fed.groups_across_nodes=true to accept it")


def check_before_launch(cfg: Config, nproc: int) -> None:
    """Everything a rank would refuse before training, asked once by the launcher (`fedalign-dist
    run`), so a mistake is one line instead of one per rank under torchrun's traceback: the
    model path, ranks against clients, the partition, and what the run folder allows."""
    from fedalign_dist.data.federated import build_federated_data
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.run_folder import plan_run_dir
    preflight(cfg, nproc)
    build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, build_tokenizer(cfg.data.tokenizer, cfg.model.path))
    plan_run_dir(cfg)


def quiet_libraries() -> None:
    """The command line's processes only (the Python API changes no global setting)."""
    import torch
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # DeepSpeed's own choice here, made without its "Setting accelerator to CPU" warning in
        # every rank; inherited by the ranks a launcher starts
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # an environment variable, not datasets.disable_progress_bars(): datasets is imported only
    # where a user's files are read (its pyarrow and pandas cost every rank ~90 MB)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # saving the final model: 'Writing model shards'
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_main(config_path: str | None, overrides: list[str], progress: bool = True) -> list[dict]:
    """The command line's rank: quiet third-party libraries, then train."""
    cfg = load_config(config_path, overrides, world_size=launched_world_size())
    quiet_libraries()
    return train(cfg, progress)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def train(cfg: Config, progress: bool = False) -> list[dict]:
    """One rank of a run of `cfg` in this process (a world of one unless launched as a rank of
    a torchrun/srun job); returns the round records. Changes no global setting of the process."""
    world_size = launched_world_size()
    local = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE"))
    preflight(cfg, world_size, int(local) if local and local.isdigit() else None)
    from fedalign_dist.data.federated import build_federated_data
    from fedalign_dist.data.tokenizer import build_tokenizer
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.model.path)
    data = build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, tokenizer)  # partition errors here

    from fedalign_dist import run_lifecycle
    from fedalign_dist.distributed.env import init_distributed, shutdown
    from fedalign_dist.runner import Runner
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        run_lifecycle.prepare(cfg)
        return Runner(cfg, env, data, tokenizer).run(progress=progress)
    finally:
        shutdown()

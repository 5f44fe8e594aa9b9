"""The compute floor of a federated round: the same clients, placement, batches and local
steps as a FedAvg run of the framework, in plain torch (AdamW, gradient clipping, one
all_reduce of the weighted deltas), with nothing else: no DeepSpeed engine, update guard,
metrics, checkpoints or evaluation. The systems suite runs it in the same processes layout
(torchrun, 2 ranks) beside the framework to measure the framework's overhead.

    torchrun --nproc-per-node 2 -m fedalign_dist.benchmark.floor --config F --out floor.json [key=value ...]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.distributed as dist

from fedalign_dist import json_files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's YAML config")
    parser.add_argument("--out", required=True, help="JSON file for the seconds of every round (rank 0 writes)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    from fedalign_dist.clients.trainer import client_batches
    from fedalign_dist.config import load_config
    from fedalign_dist.data.federated import build_federated_data
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.distributed.env import init_distributed
    from fedalign_dist.distributed.placement import balanced_placement, client_cost, sample_clients
    from fedalign_dist.models.build import build_model
    from fedalign_dist.train import quiet_libraries

    quiet_libraries()
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.model.path)
    data = build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, tokenizer)
    model, _ = build_model(cfg, tokenizer)
    model.to(env.device).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_state = {n: p.detach().clone() for n, p in params.items()}
    aux = float(getattr(model.config, "router_aux_loss_coef", 0.0))
    seconds = []
    for round_idx in range(cfg.fed.rounds):
        start = time.perf_counter()
        sampled = sample_clients(cfg.seed, round_idx, cfg.fed.num_clients, cfg.fed.clients_per_round)
        costs = [client_cost(cfg.local.steps_for(data.num_train(c)) * cfg.local.batch_size, 0) for c in sampled]
        hosts = balanced_placement(sampled, costs, env.world_size)
        summed = torch.zeros(sum(t.numel() for t in global_state.values()) + 1, device=env.device)
        for client in (c for c, rank in hosts.items() if rank == env.rank):
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(global_state[name])
            optimizer = torch.optim.AdamW(params.values(), lr=cfg.local.lr, weight_decay=cfg.local.weight_decay)
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, round_idx, client]).generate_state(1)[0]))
            steps = cfg.local.steps_for(data.num_train(client))
            for batch in client_batches(data, data.clients[client]["train"], steps, cfg.local.batch_size, cfg.seed,
                                        round_idx, client):
                batch = {k: v.to(env.device) for k, v in batch.items()}
                loss = data.task.loss(model, batch, aux)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.local.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params.values(), cfg.local.grad_clip)
                optimizer.step()
            n = data.num_train(client)
            with torch.no_grad():
                summed[:-1] += n * torch.cat([(p - global_state[name]).reshape(-1) for name, p in params.items()])
                summed[-1] += n
        dist.all_reduce(summed)
        offset = 0
        for name, t in global_state.items():
            t += (summed[offset:offset + t.numel()] / summed[-1]).view_as(t)
            offset += t.numel()
        seconds.append(time.perf_counter() - start)
    if env.rank == 0:
        with open(args.out, "w") as f:
            f.write(json_files.dumps({"seconds_per_round": seconds, "world_size": env.world_size}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

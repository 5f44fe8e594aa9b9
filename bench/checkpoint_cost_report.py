"""What a checkpoint costs with many clients holding state on disk (fed.client_state=disk),
and how that cost follows the clients changed since the previous checkpoint: a disk store
with N clients' states (each the size of one tiny-Mixtral personal expert set), a first
checkpoint, then three more, each after `changed` clients were rewritten (keep=2: the last
two also prune one and free the blobs no kept checkpoint names).

    python bench/checkpoint_cost_report.py [--clients 20000] [--changed 16]     # ~1 min
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedalign_dist import checkpoint  # noqa: E402
from fedalign_dist.clients.state import DiskClientStore  # noqa: E402


def one_checkpoint(run_dir: Path, store: DiskClientStore, round_idx: int, global_state: dict) -> float:
    start = time.perf_counter()
    checkpoint.begin_checkpoint(run_dir, round_idx)
    entries = store.export_to(checkpoint.blob_dir(run_dir))
    checkpoint.stage_client_part(run_dir, round_idx, 0, entries)
    checkpoint.commit_checkpoint(run_dir, round_idx, global_state, {}, keep=2)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20000)
    parser.add_argument("--changed", type=int, default=16)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    expert = {f"layer{i}|{e}": torch.randn(64, 128, generator=gen) for i in range(2) for e in range(2)}  # 128 kB
    global_state = {"w": torch.randn(1000, 64, generator=gen)}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        store = DiskClientStore(run_dir / "clients" / "rank0")
        start = time.perf_counter()
        for client in range(args.clients):
            store.put(client, "personal", {k: v + client for k, v in expert.items()})  # distinct contents
        written = time.perf_counter() - start
        first = one_checkpoint(run_dir, store, 0, global_state)
        later = []
        for round_idx in (1, 2, 3):  # from the third on, each also prunes one and frees its blobs
            for client in range(args.changed):
                store.put(client, "personal", {k: v + client + round_idx / 8 for k, v in expert.items()})
            later.append(one_checkpoint(run_dir, store, round_idx, global_state))
        assert checkpoint.verify_checkpoint(checkpoint.checkpoint_dir(run_dir, 3)) is None
        blobs = len(list(checkpoint.blob_dir(run_dir).glob("*/*.safetensors")))
        assert blobs == args.clients + args.changed  # rounds 2 and 3 kept
        print(f"{args.clients} clients' states written in {written:.1f} s; first checkpoint {first:.2f} s; "
              f"then {args.changed} changed before each: {', '.join(f'{s:.2f}' for s in later)} s "
              f"({blobs} blobs kept)")


if __name__ == "__main__":
    main()

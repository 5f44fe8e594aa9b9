"""What a checkpoint costs with many clients holding state on disk (fed.client_state=disk),
and how that cost follows the clients changed since the previous checkpoint: a disk store
with N clients' states (each the size of one tiny-Mixtral personal expert set), a first
checkpoint, then `changed` clients rewritten and a second checkpoint.

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
    staging = checkpoint.begin_checkpoint(run_dir, round_idx)
    digests = store.export_to(staging / "clients")
    checkpoint.commit_checkpoint(run_dir, round_idx, global_state, {}, keep=2, client_files=[digests])
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
            store.put(client, "personal", expert)
        written = time.perf_counter() - start
        first = one_checkpoint(run_dir, store, 0, global_state)
        for client in range(args.changed):
            store.put(client, "personal", {k: v + 1 for k, v in expert.items()})
        second = one_checkpoint(run_dir, store, 1, global_state)
        assert checkpoint.verify_checkpoint(checkpoint.checkpoint_dir(run_dir, 1)) is None
        print(f"{args.clients} clients' states written in {written:.1f} s; first checkpoint {first:.2f} s; "
              f"after {args.changed} changed: {second:.2f} s")


if __name__ == "__main__":
    main()

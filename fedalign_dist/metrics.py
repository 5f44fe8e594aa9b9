"""Round metrics: one JSON object per round in metrics.jsonl, TensorBoard scalars, and one
console line. Only the coordinator (rank 0) writes."""
from __future__ import annotations

import resource
import shutil
from pathlib import Path

from fedalign_dist import json_files


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def peak_gpu_mb(device) -> float | None:
    """Peak memory torch allocated on this rank's GPU since the start; None on CPU."""
    import torch
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def round_record(round_idx: int, strategy: str, per_rank: list[dict], evaluated: tuple[bool, bool], rejected: dict,
                 diagnostics: dict, trainable_bytes: int, task) -> dict:
    """The round's metrics record from every rank's numbers (sums and maxima over ranks): the
    task's metrics (TaskType.metrics) of the global and the personalised models, None for a
    model not evaluated this round (`evaluated` = (global, personalised))."""
    import torch

    pairs = [p for r in per_rank for p in r["updates"]]
    examples = sum(n for n, _ in pairs)
    personal = task.summarise(torch.tensor([r["personal"] for r in per_rank]).sum(0))
    glob = task.summarise(torch.tensor([r["global_"] for r in per_rank]).sum(0))
    return {
        "round": round_idx,
        "strategy": strategy,
        "num_clients_trained": len(pairs) + len(rejected),
        "num_rejected": len(rejected),
        "rejected_clients": sorted(rejected),
        "rejected_reasons": {str(cid): reason for cid, reason in sorted(rejected.items())},
        "num_clipped": sum(r["clipped"] for r in per_rank),
        "clients_per_rank": [r["clients"] for r in per_rank],
        "state_bytes_moved": sum(r["moved"] for r in per_rank),
        "train_loss": sum(n * loss for n, loss in pairs) / examples if examples else None,
        **{f"global_{m}": glob[m] if evaluated[0] else None for m in task.metrics},
        "global_nonfinite_examples": glob["nonfinite_examples"],
        **{f"personalized_{m}": personal[m] if evaluated[1] else None for m in task.metrics},
        "personalized_nonfinite_examples": personal["nonfinite_examples"],
        "bytes_sent": max(r["sent"] for r in per_rank),
        "bytes_received": max(r["received"] for r in per_rank),
        "bytes_sent_per_rank": [r["sent"] for r in per_rank],
        "bytes_received_per_rank": [r["received"] for r in per_rank],
        # client groups: rebuilding the whole global state from a group's shards, inside the group
        "bytes_sent_within_group_per_rank": [r["within_group"] for r in per_rank],
        "trainable_bytes": trainable_bytes,
        **{k: max(r[k.removesuffix("_s")] for r in per_rank)
           for k in ("time_local_s", "time_stats_s", "time_sync_s", "time_aggregate_s", "time_comm_s",
                     "time_eval_s", "time_round_s")},
        "peak_rss_mb": max(r["rss"] for r in per_rank),
        "peak_rss_mb_per_rank": [r["rss"] for r in per_rank],
        **({"peak_gpu_mb": max(r["gpu"] for r in per_rank), "peak_gpu_mb_per_rank": [r["gpu"] for r in per_rank]}
           if per_rank[0]["gpu"] is not None else {}),
        **diagnostics,
    }


class MetricsWriter:
    def __init__(self, run_dir: Path, replay: list[dict] | None = None):
        """replay: a resumed run's kept records; TensorBoard is rebuilt from them, so rounds
        re-run after the checkpoint appear once (metrics.jsonl is the record of truth)."""
        from torch.utils.tensorboard import SummaryWriter
        self.path = run_dir / "metrics.jsonl"
        if replay is not None:
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        for record in replay or []:
            self.log_tensorboard(record)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json_files.dumps(record) + "\n")
        self.log_tensorboard(record)

    def log_tensorboard(self, record: dict) -> None:
        step = record["round"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "round":
                self.tb.add_scalar(key, value, step)
        for name in ("consensus", "prior"):
            for layer, dist in enumerate((record.get("routing") or {}).get(name, [])):
                self.add_distribution(f"routing/{name}/layer{layer}", dist, step)
        self.tb.flush()

    def add_distribution(self, tag: str, probs: list[float], step: int) -> None:
        """A distribution over expert indices as a histogram with one bucket per expert, so
        TensorBoard draws p(e) against e."""
        experts = len(probs)
        centres = [e + 0.5 for e in range(experts)]
        self.tb.add_histogram_raw(tag, min=0.0, max=float(experts), num=sum(probs), sum=sum(
            c * p for c, p in zip(centres, probs)), sum_squares=sum(c * c * p for c, p in zip(centres, probs)),
            bucket_limits=[float(e + 1) for e in range(experts)], bucket_counts=list(probs), global_step=step)

    def close(self) -> None:
        self.tb.close()


def console_line(r: dict, metric: str) -> str:
    """One line per round; `metric` is the task's headline metric."""
    rejected = f" | {r['num_rejected']} rejected" if r.get("num_rejected") else ""
    scores = f"global {metric} {_fmt(r.get('global_' + metric))} | personal {_fmt(r.get('personalized_' + metric))}"
    privacy = (f" | eps {_fmt(r['dp_epsilon'], 2)} (delta {r['dp_delta']:g})" if "dp_delta" in r else "")
    return (
        f"round {r['round']:>3} | {r['strategy']} | loss {_fmt(r['train_loss'], 4)}{rejected} | {scores}{privacy} | "
        f"sent {r['bytes_sent'] / 1e6:.2f} MB | {r['time_round_s']:.1f} s"
    )


def _fmt(value, digits: int = 3) -> str:
    return "  -  " if value is None else f"{value:.{digits}f}"

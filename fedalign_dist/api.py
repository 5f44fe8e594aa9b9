"""The Python API: a run inside a script, a notebook or a test.

    import fedalign_dist as fd
    cfg = fd.load_config("configs/demo.yaml", ["fed.rounds=2"])      # or a dict, or None for defaults
    records = fd.run(cfg, "run.name=try1", "local.lr=1e-3")            # one record per round

In a plain process the run is a world of one rank (every client trained here); launched by
torchrun, each rank calls it. Runs in one process do not share state: each builds its own
model, engine and process group, and leaves no global setting changed.
"""
from __future__ import annotations

from pathlib import Path

from fedalign_dist.config import Config, load_config


def run(config: Config | dict | str | Path | None = None, *overrides: str, progress: bool = False) -> list[dict]:
    """Train `config` (re-validated, with `overrides` applied) and return its round records."""
    from fedalign_dist.train import train
    return train(load_config(config, list(overrides)), progress=progress)

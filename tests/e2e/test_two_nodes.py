"""Two torchrun agents on one machine act as two nodes (one rank each). Ranks stage client
states in the run folder, so it must be shared: a run folder that one node cannot see (here:
a relative run.output_dir resolved in each node's own working folder) is refused at start."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port


def _two_nodes(tmp_path, overrides):
    port, procs = free_port(), []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two",
               "-m", "fedalign_dist", "train", "--config", str(REPO / "configs/demo.yaml"), *overrides]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


@pytest.mark.slow  # four torchrun agents (~22 s)
def test_run_folder_not_shared_between_nodes_is_refused(tmp_path, tiny_overrides):
    common = [o for o in tiny_overrides if not o.startswith("run.output_dir=")] + ["fed.rounds=1", "run.name=r"]
    nodes = _two_nodes(tmp_path, common + ["run.output_dir=runs"])  # each node's own runs/ folder
    assert all(code != 0 for code, _ in nodes), [out[-2000:] for _, out in nodes]
    assert all("is not visible to rank 1" in out and "shared by every node" in out for _, out in nodes), \
        [out[-2000:] for _, out in nodes]
    # the same two nodes with one shared folder run
    nodes = _two_nodes(tmp_path, common + [f"run.output_dir={tmp_path / 'shared'}"])
    assert all(code == 0 for code, _ in nodes), [out[-3000:] for _, out in nodes]
    assert (tmp_path / "shared/r/summary.json").is_file()

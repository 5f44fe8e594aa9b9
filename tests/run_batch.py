"""Many short runs in one job: every torchrun start costs each rank ~10 s of imports and
start-up before a tiny run's 3 s of training, so the end-to-end tests that only need a run
folder share ONE real job (torchrun, gloo, DeepSpeed) that trains their runs one after
another in the same rank processes. Runs in one process share no state (the Python API's
promise, tested in test_api.py), so each run folder is what its own job would have written.

    python -m torch.distributed.run --nproc-per-node 2 tests/run_batch.py SPEC.json

SPEC.json: {"output_dir", "log_dir", "runs"}, each run {"name", "config", "overrides", "fault"
(FEDALIGN_DIST_FAULT for that run), "copy_from", "remove" (rank 0 first copies another run's
folder and deletes paths in it: what a crash leaves behind)}. Each run's output goes to LOG_DIR/NAME.log and
an exception to LOG_DIR/NAME.error; the next run starts regardless, so one broken run fails
only the tests that read it."""
import contextlib
import datetime
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from fedalign_dist.config import load_config
from fedalign_dist.faults import VARIABLE as FAULT_VARIABLE
from fedalign_dist.train import quiet_libraries, train


def start_group(store, index: int, rank: int, world: int) -> None:
    """A fresh process group per run, under its own key prefix in the launcher's store (a
    group started again under the same keys would find the previous one's addresses)."""
    dist.init_process_group("gloo", rank=rank, world_size=world, store=dist.PrefixStore(f"run_batch/{index}", store),
                            timeout=datetime.timedelta(seconds=300))


def prepare(run: dict, output_dir: Path) -> None:
    if run.get("copy_from"):
        shutil.copytree(output_dir / run["copy_from"], output_dir / run["name"])
        for path in run.get("remove", []):
            target = output_dir / run["name"] / path
            shutil.rmtree(target) if target.is_dir() else target.unlink()


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    output_dir, log_dir = Path(spec["output_dir"]), Path(spec["log_dir"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(seconds=300))  # torchrun's agent hosts it
    quiet_libraries()
    for index, run in enumerate(spec["runs"]):
        start_group(store, index, rank, world)
        if rank == 0:
            prepare(run, output_dir)
        dist.barrier()
        os.environ.pop(FAULT_VARIABLE, None)
        if run.get("fault"):
            os.environ[FAULT_VARIABLE] = run["fault"]
        log = log_dir / f"{run['name']}.log" if rank == 0 else Path(os.devnull)
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                cfg = load_config(run.get("config", "configs/demo.yaml"),
                                  [f"run.output_dir={output_dir}", f"run.name={run['name']}", *run["overrides"]])
                train(cfg)  # ends the process group when it ends, failed or not
            except Exception:  # noqa: BLE001 - recorded for the test that reads this run
                if rank == 0:
                    (log_dir / f"{run['name']}.error").write_text(traceback.format_exc())
                if dist.is_initialized():
                    dist.destroy_process_group()
    os.environ.pop(FAULT_VARIABLE, None)


if __name__ == "__main__":
    main(sys.argv[1])

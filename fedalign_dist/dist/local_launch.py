"""`fedalign-dist run`: torchrun's elastic agent, in this process, starting one `fedalign-dist
train` process per rank. Being in-process lets the launcher report an ending the way a user
wants to read it: a rank's failure once (its one-line message, and the traceback of an
unexpected error), not torchrun's ChildFailedError report; Ctrl-C stops every rank and says
how to continue the run folder."""
from __future__ import annotations

import logging
import shlex
import sys
import uuid
from pathlib import Path

INTERRUPTED = 130


def launch_local(nproc: int, rank_args: list[str], run_dir: Path, command: list[str]) -> int:
    """Run `python -m fedalign_dist train <rank_args>` on `nproc` local ranks; the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    _quiet_agent()
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "fedalign_dist", "train", *rank_args)
        return 0
    except ChildFailedError as err:
        print(failure_report(err), file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, SignalException):
        print(interrupted_report(run_dir, command), file=sys.stderr, flush=True)
        return INTERRUPTED


def _quiet_agent() -> None:
    """The agent's own log lines (a worker's exit code, where the error file is) repeat what
    failure_report says; torch.distributed.elastic sets a level on each logger, so each is set."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def failure_report(err) -> str:
    """The rank that failed: its exit (the one-line reason is in its own output above) and,
    for an unexpected error, its traceback, once. The rank that recorded a traceback is the
    cause even when a peer it stopped exited first (torchrun's "first observed failure")."""
    recorded = {r: f for r, f in err.failures.items() if isinstance(f.message, dict)}
    rank, failure = min(recorded.items(), key=lambda rf: rf[1].timestamp) if recorded else err.get_first_failure()
    message = failure.message
    lines = [f"fedalign-dist: the run failed: rank {rank} exited with code {failure.exitcode}"
             + (f" ({message})" if isinstance(message, str) and message.startswith("Signal") else "")]
    if isinstance(message, dict):
        callstack = message.get("extraInfo", {}).get("py_callstack", "").rstrip()
        if callstack:
            lines.append(f"rank {rank}'s traceback:\n{callstack}")
    others = sorted(r for r in err.failures if r != rank)
    if others:
        lines.append(f"(rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} stopped with it)")
    return "\n".join(lines)


def interrupted_report(run_dir: Path, command: list[str]) -> str:
    """What the interrupted run folder holds, and the command that continues it."""
    from fedalign_dist.checkpoint import latest_checkpoint
    rerun = "fedalign-dist " + shlex.join([a for a in command if not a.startswith(("run.resume=", "run.overwrite="))])
    head = "fedalign-dist: interrupted; every rank stopped."
    if not run_dir.is_dir():
        return head
    found = latest_checkpoint(run_dir)
    if found is not None:
        return f"{head} {run_dir} keeps checkpoint {found.name}; continue from it with:\n  {rerun} run.resume=true"
    return (f"{head} {run_dir} has no checkpoint to continue from (checkpoint.every=N writes one every N rounds); "
            f"start it again with:\n  {rerun} run.overwrite=true")

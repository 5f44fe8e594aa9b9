"""`fedalign-dist run`: one `fedalign-dist train` process per rank on this machine, started
and watched by this process, which imports neither torch nor the model libraries (torchrun's
agent would hold torch in the launcher for the whole run: 0.25 GB of the run's memory).

The ranks meet through the TCP store that rank 0 opens at MASTER_ADDR:MASTER_PORT (torch's
env:// rendezvous, as under torchrun). An unexpected error in a rank is written to its
TORCHELASTIC_ERROR_FILE (torch's own error-file format, the same code path as under
torchrun). The launcher reports an ending the way a user wants to read it: a rank's failure
once (its one-line message is in its own output; the traceback of an unexpected error
follows), and Ctrl-C stops every rank and says how to continue the run folder."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INTERRUPTED = 130
POLL_S = 0.1
PEERS_EXIT_S = 10.0
"""After a rank fails, how long the others get to stop by themselves (they learn of the
failure through the job's own agreement checks and exit non-zero) before they are terminated."""
TERMINATE_S = 10.0
"""After SIGTERM (or a forwarded SIGINT), how long before SIGKILL."""


@dataclass
class RankExit:
    rank: int
    code: int
    """The exit code; -N when signal N ended the process."""
    error: dict | None
    """The rank's recorded error ({"message", "extraInfo": {"py_callstack", ...}}), if any."""
    recorded_at: float
    stopped_by_launcher: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, error_dir: Path) -> dict[str, str]:
    """What torchrun sets for a single-node worker (and its error file)."""
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", NODE_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), TORCHELASTIC_ERROR_FILE=str(error_dir / f"rank_{rank}.json"))


def launch_local(nproc: int, rank_args: list[str], run_dir: Path, command: list[str]) -> int:
    """Run `python -m fedalign_dist train <rank_args>` on `nproc` local ranks; the exit code."""
    with tempfile.TemporaryDirectory(prefix="fedalign_launch_") as tmp:
        error_dir, port = Path(tmp), free_port()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a scheduler's stop: as Ctrl-C
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(nproc):
                procs.append(subprocess.Popen([sys.executable, "-u", "-m", "fedalign_dist", "train", *rank_args],
                                              env=rank_env(rank, nproc, port, error_dir)))
            failed = watch(procs)
            if failed is None:
                return 0
            stopped = stop(procs, first_wait=PEERS_EXIT_S, sig=signal.SIGTERM)
            print(failure_report(exits(procs, error_dir, stopped), failed), file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            stop(procs, first_wait=5.0, sig=signal.SIGINT)
            print(interrupted_report(run_dir, command), file=sys.stderr, flush=True)
            return INTERRUPTED
        finally:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def watch(procs: list[subprocess.Popen]) -> int | None:
    """Wait until every rank ended well (None) or one failed (its rank)."""
    while True:
        codes = [p.poll() for p in procs]
        bad = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if bad:
            return bad[0]
        if all(code == 0 for code in codes):
            return None
        time.sleep(POLL_S)


def stop(procs: list[subprocess.Popen], first_wait: float, sig: int) -> set[int]:
    """Give running ranks `first_wait` seconds to end by themselves, then send `sig`, then
    SIGKILL after TERMINATE_S: no rank outlives the launcher. The ranks signalled."""
    signalled = set()
    for wait, action in ((first_wait, sig), (TERMINATE_S, signal.SIGKILL)):
        deadline = time.monotonic() + wait
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for rank, p in enumerate(procs):
            if p.poll() is None:
                p.send_signal(action)
                signalled.add(rank)
    for p in procs:
        p.wait()
    return signalled


def exits(procs: list[subprocess.Popen], error_dir: Path, stopped: set[int]) -> list[RankExit]:
    result = []
    for rank, p in enumerate(procs):
        path = error_dir / f"rank_{rank}.json"
        error, at = None, float("inf")
        if path.is_file():
            try:
                error, at = json.loads(path.read_text())["message"], path.stat().st_mtime
            except (OSError, ValueError, KeyError):
                pass
        result.append(RankExit(rank, p.returncode, error if isinstance(error, dict) else None, at, rank in stopped))
    return result


def failure_report(ended: list[RankExit], first_failed: int) -> str:
    """The rank that failed: its exit (the one-line reason is in its own output above) and,
    for an unexpected error, its traceback, once. The cause is a rank ended by a signal from
    outside (a crash, the OOM killer, a kill): its peers then fail on the broken connection
    and record errors of their own; else the rank that recorded an error first, even when a
    peer it stopped exited before it; else the first rank seen failing."""
    killed = [e for e in ended if e.code < 0 and not e.stopped_by_launcher]
    recorded = [e for e in ended if e.error is not None]
    cause = (killed[0] if killed else min(recorded, key=lambda e: e.recorded_at) if recorded
             else ended[first_failed])
    lines = [f"fedalign-dist: the run failed: rank {cause.rank} exited with code {cause.code}"
             + (f" (killed by {signal.Signals(-cause.code).name})" if cause.code < 0 else "")]
    callstack = ((cause.error or {}).get("extraInfo") or {}).get("py_callstack", "").rstrip()
    if callstack:
        lines.append(f"rank {cause.rank}'s traceback:\n{callstack}")
    others = sorted(e.rank for e in ended if e.rank != cause.rank and e.code != 0)
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

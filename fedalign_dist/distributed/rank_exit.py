"""How a rank process ends (no torch here: the launcher imports it too, and imports no torch)."""
from __future__ import annotations

import logging
import os
import sys


def end_rank(code: int) -> None:
    """A rank exits with os._exit once everything it wrote is closed and flushed. Seen on a
    finished 2-rank run (CI): a third-party C++ thread still joinable at interpreter
    finalization aborted rank 1 ("terminate called without an active exception", SIGABRT,
    no Python frame left on the stack), and torchrun failed the job; the same abort ended a
    passed 2-rank test script. os._exit skips that finalization, so a caller finishes its
    files first (a run writes summary.json, and every rank waits for it, before the process
    group is destroyed)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

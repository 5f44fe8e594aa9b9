"""A real one-node SLURM cluster for tests: munge, slurmctld and slurmd from the Debian
packages (slurm-wlm), configured under a temporary folder. Only the daemons started here
are stopped, by their pid files, after checking that the pid is still that daemon."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "sinfo")
INSTALL_HINT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (None: it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; `{INSTALL_HINT}` as root)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive_as(pid: int, name: str) -> bool:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip() == name
    except OSError:
        return False


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.started: list[tuple[str, Path]] = []

    def _node_line(self) -> str:
        line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        memory = int(re.search(r"RealMemory=(\d+)", line).group(1))
        line = re.sub(r"RealMemory=\d+", f"RealMemory={max(memory - 1024, 512)}", line)
        return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"

    def write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=fedalign-test", f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "SchedulerParameters=batch_sched_delay=0", "MinJobAge=5",
            "ReturnToService=2", "MpiDefault=none",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd.log",
            self._node_line(),
            f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return  # somebody else's munged: use it, never stop it
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        self.started.append(("munged", Path("/run/munge/munged.pid")))

    def start(self, timeout: float = 30) -> "SlurmCluster":
        self.write_config()
        self._start_munge()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        self.started.append(("slurmctld", self.root / "slurmctld.pid"))
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        self.started.append(("slurmd", self.root / "slurmd.pid"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env).stdout
            if state.strip() == "idle":
                return self
            time.sleep(0.3)
        raise RuntimeError(f"SLURM node never became idle:\n{self.logs()}")

    def sbatch_wait(self, script: str, args: list[str], cwd: Path, output: Path, extra: list[str] = (),
                    timeout: float = 900) -> subprocess.CompletedProcess:
        cmd = ["sbatch", "--wait", f"--output={output}", *extra, script, *args]
        return subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in (self.root / "slurmctld.log", self.root / "slurmd.log")
                         if p.exists())

    def stop(self) -> None:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env).stdout.split()
        if jobs:
            subprocess.run(["scancel", *jobs], env=self.env, capture_output=True)
        for name, pidfile in reversed(self.started):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            if _pid_alive_as(pid, name):
                os.kill(pid, 15)
                for _ in range(50):
                    if not _pid_alive_as(pid, name):
                        break
                    time.sleep(0.1)
        self.started.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

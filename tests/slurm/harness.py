"""A one-node Slurm cluster on this machine, without systemd: munged, slurmctld -D and slurmd -D.

Debian's Slurm 22.05 runs with `ProctrackType=proctrack/linuxproc` and `TaskPlugin=task/none` (no
cgroups), munged as the munge user, and everything else from a private slurm.conf (SLURM_CONF)
with private ports, state and log folders. The daemons it starts are stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "sinfo")


def missing() -> list[str]:
    """The Slurm and munge programs this machine lacks."""
    where = {"slurmctld": "/usr/sbin", "slurmd": "/usr/sbin", "munged": "/usr/sbin"}
    return [d for d in DAEMONS if shutil.which(d, path=os.pathsep.join([where.get(d, ""), os.environ["PATH"]])) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OneNodeCluster:
    """Start with `start()`, submit with `sbatch()`, stop with `stop()` (also on failure)."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 2
        self.conf.write_text("\n".join([
            "ClusterName=revprompt-test",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.host} CPUs={cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def start(self, timeout_s: float = 60) -> None:
        """munged (unless one runs), slurmctld, slurmd; wait until the node is idle."""
        self.write_conf()
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self.munged_pid = int(Path("/run/munge/munged.pid").read_text())
        for daemon in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd"):
            log = open(self.root / "log" / f"{Path(daemon).name}.stdout", "w")
            self.procs.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT))
            time.sleep(0.5)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}: {self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not become idle in {timeout_s} s: {self.logs()}")

    def sbatch(self, script: Path, *args: str, env: dict | None = None, timeout_s: float = 900,
               extra: list[str] | None = None) -> tuple[int, int]:
        """Submit, wait for the end (`sbatch --wait`); returns (job id, exit code)."""
        cmd = ["sbatch", "--parsable", "--wait", *(extra or []), str(script), *args]
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout_s,
                              cwd=(env or {}).get("PWD", None))
        job = int(proc.stdout.strip().split(";")[0]) if proc.stdout.strip() else -1
        return job, proc.returncode

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*"))
                         if p.is_file())

    def stop(self) -> None:
        """SIGTERM the daemons this harness started (by PID), then SIGKILL what is left."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

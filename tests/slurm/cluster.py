"""A real one-node Slurm cluster on loopback, for tests and for trying the Slurm path.

`SlurmCluster(tmp).start()` installs Debian's packages if `slurmctld` is missing (root
only), starts munged if none is running, writes a slurm.conf under `tmp` (free ports, state
and logs in `tmp`), starts slurmctld and slurmd by hand (no systemd) and waits until the
node is idle. `stop()` ends only the daemons it started. `SLURM_CONF` is what clients need.

    python -m tests.slurm.cluster /tmp/slurm   # start one and leave it running (prints SLURM_CONF)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_if_needed() -> str | None:
    """None when Slurm is usable, else the reason it is not."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and this is not a root Debian machine to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-500:]}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.started: list[Path] = []  # pid files of daemons this object started
        self.munge_pid: int | None = None

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already answering
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)
        pid_file = run / "munged.pid"
        for _ in range(50):
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        if pid_file.exists():
            self.munge_pid = int(pid_file.read_text().split()[0])

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=growtest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "AuthInfo=cred_expire=10",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}", f"SlurmdLogFile={r / 'log/slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "SchedulerParameters=bf_interval=2,sched_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={r / 'log/jobcomp.txt'}",
            "MpiDefault=none", "ReturnToService=2", "MinJobAge=600",
            "KillWait=30", "InactiveLimit=0",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        reason = install_if_needed()
        if reason:
            raise RuntimeError(reason)
        self._start_munge()
        self.write_conf()
        env = self.env
        subprocess.run(["/usr/sbin/slurmctld", "-i", "-f", str(self.conf)], env=env, check=True,
                       capture_output=True)
        self.started.append(self.root / "slurmctld.pid")
        subprocess.run(["/usr/sbin/slurmd", "-N", "localhost", "-f", str(self.conf)], env=env, check=True,
                       capture_output=True)
        self.started.append(self.root / "slurmd.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Slurm node did not become idle in {timeout:.0f}s; logs in {self.root / 'log'}")

    def stop(self) -> None:
        pids = []
        for pid_file in self.started:
            try:
                pids.append(int(pid_file.read_text().split()[0]))
            except (OSError, ValueError):
                continue
        if self.munge_pid:
            pids.append(self.munge_pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + 15
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started, self.munge_pid = [], None


if __name__ == "__main__":
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/grow-slurm")).start()
    print(f"export SLURM_CONF={cluster.conf}")

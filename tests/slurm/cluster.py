"""A real Slurm cluster on loopback, one node or several, for tests and for trying the Slurm path.

`SlurmCluster(tmp).start()` installs Debian's packages if `slurmctld` is missing (root
only), starts munged if none is running, writes a slurm.conf under `tmp` (free ports, state
and logs in `tmp`), starts slurmctld and slurmd by hand (no systemd) and waits until the
node is idle. `stop()` ends only the daemons it started. `SLURM_CONF` is what clients need.

`SlurmCluster(tmp, nodes=2)` runs nodes n1, n2 on this one machine: one stock slurmd each
(`slurmd -N n1`, its own port, spool, pid and log), all at 127.0.0.1, with short timeouts so
that a node's death is noticed in seconds. `kill_node("n2")` crashes a node for real: its
slurmd, the slurmstepds under its spool and every process of its jobs die at once.

    python -m tests.slurm.cluster /tmp/slurm [NODES]  # start one and leave it running (prints SLURM_CONF)
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
    def __init__(self, root: Path, cpus: int | None = None, nodes: int = 1):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.nodes = nodes
        self.names = ["localhost"] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
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
        if self.nodes > 1:
            return self._write_multi_node_conf()
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

    def _write_multi_node_conf(self) -> None:
        """Several slurmd on one host (ENVIRONMENT.md: several Slurm nodes on one machine)."""
        r = self.root
        for d in ("state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        ports = [_free_port() for _ in self.names]
        srun = _free_port()
        self.conf.write_text("\n".join([
            "ClusterName=growmulti",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SrunPortRange={srun}-{srun + 50}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", "AuthInfo=cred_expire=10",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2,bf_interval=1",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={r / 'log/jobcomp.txt'}",
            "MpiDefault=none", "ReturnToService=2", "MinJobAge=600",
            "SlurmctldTimeout=10", "SlurmdTimeout=1", "MessageTimeout=2", "KillWait=3", "InactiveLimit=0",
            *(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
              "RealMemory=1000 State=UNKNOWN" for n, p in zip(self.names, ports)),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def slurmd_pid_file(self, node: str) -> Path:
        return self.root / ("slurmd.pid" if self.nodes == 1 else f"run/slurmd-{node}.pid")

    def start_node(self, node: str) -> None:
        subprocess.run(["/usr/sbin/slurmd", "-N", node, "-f", str(self.conf)], env=self.env, check=True,
                       capture_output=True)
        if self.slurmd_pid_file(node) not in self.started:
            self.started.append(self.slurmd_pid_file(node))

    def node_state(self, node: str) -> str:
        return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], env=self.env, capture_output=True,
                              text=True).stdout.strip()

    def kill_node(self, node: str) -> list[int]:
        """A real crash of `node`: SIGKILL to its slurmd, to the slurmstepds whose sockets are in
        its spool directory, and to every process whose environment says it runs there
        (SLURMD_NODENAME). Killing slurmd alone is not a crash: its steps would run on."""
        victims = set()
        try:
            victims.add(int(self.slurmd_pid_file(node).read_text().split()[0]))
        except (OSError, ValueError):
            pass
        spool = str(self.root / "spool" / node)
        sockets = _unix_sockets()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if ("slurmstepd" in cmd and any(sockets.get(link, "").startswith(spool) for link in _links(proc))) \
                    or f"SLURMD_NODENAME={node}".encode() in env:
                victims.add(int(proc.name))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return sorted(victims)

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
        for node in self.names:
            self.start_node(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            states = out.split()
            if len(states) == len(self.names) and all(s in ("idle", "mix", "alloc") for s in states):
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


def _unix_sockets() -> dict[str, str]:
    """'socket:[inode]' -> the path a unix socket is bound to (what /proc/PID/fd shows of one)."""
    out = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8:
            out[f"socket:[{parts[6]}]"] = parts[7]
    return out


def _links(proc: Path) -> list[str]:
    """Where a process's open files and sockets point (what it can read of them)."""
    links = []
    try:
        for fd in (proc / "fd").iterdir():
            try:
                links.append(os.readlink(fd))
            except OSError:
                continue
    except OSError:
        pass
    return links


if __name__ == "__main__":
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/grow-slurm"),
                           nodes=int(sys.argv[2]) if len(sys.argv) > 2 else 1).start()
    print(f"export SLURM_CONF={cluster.conf}")

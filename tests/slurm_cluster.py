"""A real one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd from Debian's
slurm-wlm and munge, run in the foreground from a temporary directory (own key, socket, ports,
state), and stopped by their PIDs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import clean_env, free_port

SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
        "BOOT_FAIL", "DEADLINE"}
# Credential lifetime, and so how long Slurm holds a requeued job before it may start again (default
# 120 s; forcing an earlier start makes slurmd refuse the job: "Job credential revoked").
CRED_EXPIRE_S = 10
APT_LINE = "apt-get install -y --no-install-recommends slurm-wlm munge"


def missing_reason() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    path = os.environ.get("PATH", "") + ":" + SBIN
    absent = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=path) is None]
    if absent:
        return f"no {', '.join(absent)}: needs Debian's slurm-wlm and munge ({APT_LINE})"
    if os.geteuid() != 0:
        return "slurmd and munged --force need root"
    return None


def _conf(root: Path, cpus: int) -> str:
    ctld_port, slurmd_port = free_port(), free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    return f"""ClusterName=sifttest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/sock,cred_expire={CRED_EXPIRE_S}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
KillWait=10
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=3600
NodeName=localhost CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.cpus = cpus
        self.procs: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = clean_env(SLURM_CONF=str(self.conf), **extra)
        env["PATH"] = env.get("PATH", "") + ":" + SBIN
        return env

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, **kwargs)

    def start(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(_conf(self.root, self.cpus))
        munge = self.root / "munge"
        self._spawn("munged", "--foreground", "--force", f"--socket={munge}/sock", f"--key-file={key}",
                    f"--pid-file={munge}/pid", f"--log-file={munge}/log", f"--seed-file={munge}/seed")
        self._wait_for(lambda: (munge / "sock").exists(), "munged socket", munge / "log")
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-N", "localhost", "-f", str(self.conf))
        self._wait_for(lambda: self.run("sinfo", "-h", "-o", "%t").stdout.strip() == "idle",
                       "the node to be idle", self.root / "log" / "slurmctld.log")

    def _spawn(self, name: str, *args: str) -> None:
        exe = shutil.which(name, path=SBIN)
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen([exe, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env()))

    def _wait_for(self, ready, what: str, log: Path, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                tail = log.read_text()[-3000:] if log.exists() else ""
                raise RuntimeError(f"Slurm test cluster: no {what} (exited: {dead})\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons we started, by PID, newest first."""
        if self.procs and self.procs[-1].poll() is None:
            self.run("scancel", "--user", "root")
            deadline = time.time() + 40
            while self.run("squeue", "-h").stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def sbatch(self, *args: str, env: dict[str, str], cwd: Path) -> str:
        result = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o` as dicts, one per job (an array gives one per task)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        deadline = time.time() + timeout
        while True:
            jobs = self.jobs(job_id)
            if jobs and all(j["JobState"] in DONE for j in jobs):
                return jobs
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} not done after {timeout} s: {jobs}\n{self.logs(job_id)}")
            time.sleep(0.5)

    def logs(self, job_id: str) -> str:
        """The job's output file(s), for assertion messages and log checks."""
        paths = sorted({j["StdOut"] for j in self.jobs(job_id) if j.get("StdOut")})
        return "\n".join(Path(p).read_text(errors="replace").replace("\r", "\n")
                         for p in paths if os.path.isfile(p))

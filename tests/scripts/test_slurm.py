"""scripts/pretrain_slurm.sbatch on a real single-node slurm cluster that the test starts itself.

munged, slurmctld and slurmd (Debian's ``munge`` and ``slurm-wlm``) run from a temporary directory
with a minimal slurm.conf: localhost, one node, no cgroups (proctrack/linuxproc, task/none), no
accounting. sbatch then runs the script's one-task-per-GPU launch with 2 tasks on CPU
(gloo): the tasks must find each other through slurm's variables and train as one 2-rank world.
The job is submitted and waited for as `sbatch --wait` does, polling more often.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_moe.parallel.mesh import first_host
from megatron_moe.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")


def _missing() -> str:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"slurm/munge binaries missing ({', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the test cluster runs slurmd as root (SlurmUser=root)"
    return ""


pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_missing()), reason=_missing() or "-")]


def _slurm_conf(root: Path, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=mmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_files: list[Path]) -> None:
    """SIGTERM the daemons named in ``pid_files``; SIGKILL those not gone within 2 s (their state is a
    temporary directory)."""
    pids = []
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    deadline = time.monotonic() + 2
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster; yields the environment that reaches it (SLURM_CONF). Torn down after."""
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(parents=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, free_port(), free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[name]  # a test run inside someone's allocation must not leak into this cluster's job
    pid_files = [root / "slurmd.pid", root / "slurmctld.pid", root / "munge" / "munged.pid"]
    try:
        m = root / "munge"
        subprocess.run(["munged", f"--socket={m}/munge.sock", f"--key-file={key}", f"--pid-file={m}/munged.pid",
                        f"--log-file={m}/munged.log", f"--seed-file={m}/seed", "--force"], check=True, timeout=30)
        subprocess.run(["slurmctld", "-i"], env=env, check=True, timeout=30)
        subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
            if state.stdout.strip() == "idle":
                break
            if time.monotonic() > deadline:
                logs = "\n".join((root / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log")
                                 if (root / f).is_file())
                pytest.fail(f"the test slurm cluster did not come up (sinfo: {state.stdout!r} {state.stderr!r})\n"
                            f"{logs}")
            time.sleep(0.3)
        yield env
    finally:
        if (root / "slurmctld.pid").is_file():  # a job still running (a failed test) ends with the cluster
            queued = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30)
            if queued.stdout.strip():
                subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
                time.sleep(1)
        _stop(pid_files)


def _wait_for_job(job_id: str, env: dict, timeout: float) -> tuple[str, str]:
    """(JobState, ExitCode) once the job has ended: `sbatch --wait`, polled every 0.2 s instead of
    sbatch's back-off of up to 10 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        show = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                              timeout=30).stdout
        fields = dict(f.split("=", 1) for f in show.split() if "=" in f)
        if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return fields["JobState"], fields.get("ExitCode", "")
        time.sleep(0.2)
    pytest.fail(f"slurm job {job_id} did not end within {timeout} s")


def test_scontrol_agrees_with_first_host(slurm_cluster):
    """first_host (the launch's own parser) against slurm's `scontrol show hostnames`."""
    for nodelist in ("node1", "gpu[003-010,12],cpu1", "rack[2-3]-n[07-09]", "a,b[1-2]"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=slurm_cluster, capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        assert first_host(nodelist) == out[0]


def test_sbatch_one_task_per_gpu_trains_one_two_rank_world(slurm_cluster, loop_corpus, tmp_path):
    run = tmp_path / "run"
    out = tmp_path / "job.out"
    flags = ["--training.device", "cpu", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--seq-length", "16", "--micro-batch-size", "1",
             "--global-batch-size", "2", "--train-iters", "2", "--eval-iters", "0",
             "--log-interval", "1", "--lr", "1e-3", "--data-path", loop_corpus["prefix"],
             "--tokenizer-model", loop_corpus["tokenizer"], "--split", "90,10,0",
             "--data-cache-path", str(loop_corpus["root"] / "cache"), "--save", str(run), "--load", str(run)]
    env = {**slurm_cluster, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    submit = subprocess.run(["sbatch", "--parsable", "--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0",
                             "--cpus-per-task", "1", "--time", "5", "--output", str(out),
                             str(ROOT / "scripts" / "pretrain_slurm.sbatch"), *flags],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    state = _wait_for_job(submit.stdout.strip().split(";")[0], env, timeout=240)
    log = out.read_text() if out.is_file() else ""
    assert state == ("COMPLETED", "0:0"), f"{state}\n{log}"
    assert "tp=1 pp=1 dp=2 (2 ranks)" in log, log  # one world of two ranks, not two worlds of one
    assert log.count("model:") == 1, log  # only global rank 0 prints
    assert (run / "latest").read_text().strip() == "iter_0000002"
    records = (run / "metrics.jsonl").read_text().splitlines()
    assert 2 in {json.loads(r).get("step") for r in records} and len(records) == len(set(records)), records


def test_a_batch_script_of_two_tasks_running_the_program_directly_is_refused(slurm_cluster, tmp_path):
    """No srun: one process in a 2-task allocation would train alone; it stops with a configuration error."""
    out = tmp_path / "job.out"
    env = {**slurm_cluster, "PYTHONPATH": str(ROOT)}
    submit = subprocess.run(["sbatch", "--parsable", "--ntasks", "2", "--cpus-per-task", "1", "--output", str(out),
                             "--wrap", f"{sys.executable} pretrain_moe.py --training.device cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    state = _wait_for_job(submit.stdout.strip().split(";")[0], env, timeout=120)
    log = out.read_text()
    assert state == ("FAILED", "2:0"), f"{state}\n{log}"  # exit code 2: configuration error
    assert "a slurm batch script or allocation of 2 tasks runs this program directly" in log, log

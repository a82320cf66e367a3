"""``launch/run_gravac.sh`` across two emulated hosts (network namespaces with their own sshd,
hostname and address; see ``tests/cluster.py``), under each launcher: 4 ranks end with
identical parameters, and a rank killed on one host ends the job on both hosts.

Runs when this machine can emulate hosts (root, iproute2, openssh-server: ``make install``
installs the last two when run as root); skipped with the reason otherwise.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster import INTERFACE, SSH_PORT, EmulatedCluster, why_unavailable

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ("horovodrun", "horovodrun-mpi", "mpirun")
TRAIN = ["--model", "mlp", "--data", "digits", "--window", "5", "--interval-unit", "steps",
         "--no-progress"]

unavailable = why_unavailable()
pytestmark = pytest.mark.skipif(unavailable is not None, reason=unavailable or "")


@pytest.fixture(scope="module")
def cluster():
    with EmulatedCluster(hosts=2) as c:
        yield c


def launch(cluster, launcher, out, *flags):
    """``run_gravac.sh`` started on the first host with 2 slots on each host; its output goes
    to ``out/launcher.log``."""
    env = dict(os.environ, NP="4", HOSTS=",".join(f"{h}:2" for h in cluster.names),
               LAUNCHER=launcher, SSH_PORT=str(SSH_PORT), SSH_IDENTITY_FILE=str(cluster.key),
               NETWORK_INTERFACE=INTERFACE, VENV=str(Path(sys.executable).parent.parent))
    return cluster.popen(cluster.names[0], ["bash", str(ROOT / "launch" / "run_gravac.sh"),
                                            *TRAIN, "--out", str(out), *flags],
                         env=env, stdout=open(out / "launcher.log", "w"), stderr=subprocess.STDOUT)


def ranks_by_host(cluster):
    """Training processes (the Python interpreters running gravac-train) by emulated host."""
    found = {name: [] for name in cluster.names}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) > 1 and Path(cmd[0]).name.startswith("python") and cmd[1].endswith("gravac-train"):
            host = cluster.host_of(proc.pid)
            if host in found:
                found[host].append(proc)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_four_ranks_on_two_hosts_end_identical(cluster, launcher, tmp_path):
    job = launch(cluster, launcher, tmp_path, "--steps", "12", "--eval-interval", "12")
    assert job.wait(timeout=300) == 0, (tmp_path / "launcher.log").read_text()[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranks"] == 4 and summary["steps"] == 12
    assert sorted(summary["hosts"]) == sorted(cluster.names * 2), summary["hosts"]
    assert summary["replicas_identical"], summary["parameter_digests"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_rank_killed_on_one_host_ends_the_job_on_both(cluster, launcher, tmp_path):
    job = launch(cluster, launcher, tmp_path, "--steps", "1000000", "--eval-interval", "1000000")
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "steps.csv").exists() or \
                (tmp_path / "steps.csv").read_text().count("\n") < 3:  # training has started
            assert job.poll() is None, (tmp_path / "launcher.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "training did not start within 120 s"
            time.sleep(0.5)
        ranks = ranks_by_host(cluster)
        assert [len(ranks[h]) for h in cluster.names] == [2, 2], ranks
        victim = ranks[cluster.names[1]][0]
        victim.kill()
        killed = time.monotonic()
        try:
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{launcher} still runs 60 s after a rank on {cluster.names[1]} was killed")
        while any(ranks_by_host(cluster).values()):
            assert time.monotonic() - killed < 60, \
                f"ranks still alive 60 s after the kill: {ranks_by_host(cluster)}"
            time.sleep(0.5)
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

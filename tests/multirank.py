"""Run a script on N real ranks under ``mpirun`` or ``horovodrun --gloo`` and collect results.

Each rank script calls :func:`report` with a dict of picklable results; the parent reads one
file per rank. A rank that fails or a job that hangs fails the test with every rank's output.
Launching costs ~5 s (interpreter + torch + Horovod init), so a script should check many
things per launch.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

LAUNCHERS = ("mpirun", "gloo")
RESULT_ENV = "HOROVOD_GRAVAC_TEST_RESULT_DIR"
RANKS_DIR = Path(__file__).parent / "ranks"


class MultiRankError(AssertionError):
    """A multi-rank job failed or timed out; the message carries every rank's output."""


def launch_command(launcher: str, np: int, argv: Sequence[str]) -> list[str]:
    """The command line that starts ``argv`` on ``np`` local ranks with ``launcher``."""
    bindir = Path(sys.executable).parent
    if launcher == "mpirun":
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise MultiRankError("mpirun not found: run launch/install.sh (installs Open MPI)")
        cmd = [mpirun, "-np", str(np), "--oversubscribe", "--bind-to", "none",
               "-x", RESULT_ENV, "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        return cmd + [sys.executable, *argv]
    if launcher == "gloo":
        return [str(bindir / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo",
                sys.executable, *argv]
    raise ValueError(f"unknown launcher {launcher!r}; expected one of {LAUNCHERS}")


def run_ranks(script: str, np: int, launcher: str, args: Sequence[str] = (),
              timeout: float = 120.0) -> list[dict[str, Any]]:
    """Run ``tests/ranks/<script>`` on ``np`` ranks and return each rank's report, by rank."""
    return _run(lambda path: launch_command(launcher, np, [path, *args]), script, range(np),
                timeout, f"{launcher} -np {np} {script}")


def run_torchrun(script: str, np: int, args: Sequence[str] = (),
                 timeout: float = 180.0) -> list[dict[str, Any]]:
    """Run ``tests/ranks/<script>`` on ``np`` local ranks under ``torchrun`` (the script
    initialises torch.distributed itself) and return each rank's report, by rank."""
    torchrun = Path(sys.executable).parent / "torchrun"
    return _run(lambda path: [str(torchrun), "--standalone", "--nproc_per_node", str(np),
                              path, *args], script, range(np), timeout,
                f"torchrun --nproc_per_node {np} {script}")


def run_elastic(script: str, np: int, min_np: int, max_np: int, hosts: str,
                args: Sequence[str] = (), timeout: float = 120.0,
                reporting: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Run ``script`` under ``horovodrun`` elastic mode on local slots.

    The host discovery script prints the file named by ``$HOROVOD_GRAVAC_HOSTS_FILE``
    (initially ``hosts``), so a rank can add or remove slots while the job runs. Returns the
    reports of the ``reporting`` ranks (default: all ``np``).
    """
    work = Path(tempfile.mkdtemp(prefix="hvdgravac-elastic-"))
    try:
        hosts_file, discovery = work / "hosts", work / "discover.sh"
        hosts_file.write_text(hosts + "\n")
        discovery.write_text('#!/bin/sh\ncat "$HOROVOD_GRAVAC_HOSTS_FILE"\n')
        discovery.chmod(0o755)
        command = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(np),
                   "--min-np", str(min_np), "--max-np", str(max_np),
                   "--host-discovery-script", str(discovery),
                   # one host: say which interface, or elastic waits for a second host
                   "--network-interface", "lo", "--elastic-timeout", "60", sys.executable]
        return _run(lambda path: [*command, path, *args], script,
                    range(np) if reporting is None else reporting, timeout,
                    f"horovodrun elastic -np {np} {script}",
                    HOROVOD_GRAVAC_HOSTS_FILE=str(hosts_file))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(command, script: str, ranks: Sequence[int], timeout: float, label: str,
         **extra_env: str) -> list[dict[str, Any]]:
    path = RANKS_DIR / script
    with tempfile.TemporaryDirectory(prefix="hvdgravac-") as out:
        env = dict(os.environ, OMP_NUM_THREADS="1", **{RESULT_ENV: out}, **extra_env)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(RANKS_DIR.parent.parent), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(command(str(path)), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise MultiRankError(f"{label} hung for {timeout:.0f}s; output:\n{output}") from None
        if proc.returncode != 0:
            raise MultiRankError(f"{label} exited {proc.returncode}; output:\n{output}")
        reports = []
        for rank in ranks:
            f = Path(out) / f"rank{rank}.pt"
            if not f.exists():
                raise MultiRankError(f"rank {rank} wrote no report; output:\n{output}")
            reports.append(torch.load(f, weights_only=False))
        return reports


def report(rank: int, **results: Any) -> None:
    """Called inside a rank script: hand ``results`` back to the test that launched it.

    Outside a test (no result directory in the environment) it does nothing.
    """
    out = os.environ.get(RESULT_ENV)
    if out is None:
        return
    tmp = Path(out) / f".rank{rank}.pt"
    torch.save(results, tmp)
    tmp.rename(Path(out) / f"rank{rank}.pt")


def assert_identical_across_ranks(reports: list[dict[str, Any]], key: str = "params") -> None:
    """Every rank's ``key`` tensor (or dict of tensors) equals rank 0's bit for bit."""
    def flat(x: Any) -> torch.Tensor:
        if isinstance(x, dict):
            return torch.cat([v.reshape(-1).double() for _, v in sorted(x.items())])
        return x.reshape(-1).double()
    ref = flat(reports[0][key])
    for rank, rep in enumerate(reports[1:], start=1):
        other = flat(rep[key])
        if not torch.equal(ref, other):
            diff = (ref - other).abs().max().item()
            raise AssertionError(f"rank {rank}'s {key} differ from rank 0's (max |diff| {diff:g})")


def poison(step: list[int], rank: int, nan_step: int, inf_step: int):
    """A gradient hook that puts a NaN into rank 1's gradient at step ``nan_step`` and an Inf
    into rank 0's at ``inf_step`` (``step[0]``: the step the rank script is at)."""
    def hook(grad):
        if (step[0], rank) in ((nan_step, 1), (inf_step, 0)):
            grad = grad.clone()
            grad.view(-1)[3] = float("nan") if rank == 1 else float("inf")
        return grad
    return hook


def init_with_digits_shard() -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Inside a rank script: ``hvd.init()``, one thread, and this rank's shard of the digits
    (every SIZE-th sample from RANK, scaled to [0, 1]). Returns (rank, size, X, Y)."""
    import horovod.torch as hvd
    from sklearn.datasets import load_digits

    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    x_all, y_all = load_digits(return_X_y=True)
    return (rank, size, torch.tensor(x_all, dtype=torch.float32)[rank::size] / 16.0,
            torch.tensor(y_all)[rank::size])

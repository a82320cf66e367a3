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
    path = RANKS_DIR / script
    with tempfile.TemporaryDirectory(prefix="hvdgravac-") as out:
        env = dict(os.environ, OMP_NUM_THREADS="1", **{RESULT_ENV: out})
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(RANKS_DIR.parent.parent), env.get("PYTHONPATH", "")) if p)
        cmd = launch_command(launcher, np, [str(path), *args])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise MultiRankError(f"{launcher} -np {np} {script} hung for {timeout:.0f}s; "
                                 f"output:\n{output}") from None
        if proc.returncode != 0:
            raise MultiRankError(f"{launcher} -np {np} {script} exited {proc.returncode}; "
                                 f"output:\n{output}")
        reports = []
        for rank in range(np):
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

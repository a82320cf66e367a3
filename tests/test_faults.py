"""A rank killed with SIGKILL, or raising on bad data, mid-training: the job ends, no hang.

Every other rank must exit non-zero within 60 s, and the output must say which rank failed.
"""
import os
import subprocess
import time

import pytest

from tests.multirank import LAUNCHERS, RANKS_DIR, launch_command

DEADLINE = 60


def run_until_failure(launcher: str, np: int, how: str) -> tuple[int, float, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(RANKS_DIR.parent.parent),
                                                        os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    proc = subprocess.run(launch_command(launcher, np, [str(RANKS_DIR / "killed_rank.py"), how]),
                          env=env, capture_output=True, text=True, timeout=DEADLINE * 3,
                          start_new_session=True)
    return proc.returncode, time.monotonic() - start, proc.stdout + proc.stderr


@pytest.mark.parametrize("how", ["kill", pytest.param("raise", marks=pytest.mark.slow)])
@pytest.mark.parametrize("launcher, np", [  # make test: 2 Gloo ranks; make test-all: all
    (launcher, np) if (launcher, np) == ("gloo", 2) else
    pytest.param(launcher, np, marks=pytest.mark.slow)
    for launcher in LAUNCHERS for np in (2, 4)])
def test_a_dead_rank_ends_the_job_quickly_with_a_clear_message(launcher, np, how):
    code, elapsed, output = run_until_failure(launcher, np, how)
    assert code != 0, output
    assert elapsed < DEADLINE, f"took {elapsed:.0f}s:\n{output}"
    assert f"rank 1 dies at step 20 ({how})" in output
    if how == "raise":
        assert "IndexError: Target 10 is out of bounds" in output
    if launcher == "mpirun":
        assert ("exited on signal 9" if how == "kill" else "exited with non-zero status") in output
    else:
        assert "one or more processes exited with non-zero status" in output
        assert "Horovod has been shut down" in output  # what the surviving ranks report
        if how == "kill":
            assert "Process name: 1" in output and "Exit code: 137" in output

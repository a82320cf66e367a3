"""NaN/Inf injected on one rank: skipped on every rank, never in a memory, counted."""
import pytest
import torch

from horovod_gravac import compression as C
from tests.multirank import LAUNCHERS, assert_identical_across_ranks, run_ranks

NAN_STEP, INF_STEP = 5, 9
RUNS = [f"{n}:cf=10" if C.create(n).adjustable_cf else n for n in C.names()] + ["gravac"]


@pytest.fixture(scope="module", params=[  # make test: Gloo; make test-all: MPI too
    pytest.param(l, marks=pytest.mark.slow) if l == "mpirun" else l for l in LAUNCHERS])
def job(request):
    return run_ranks("nonfinite_checks.py", 2, request.param, timeout=300)


@pytest.mark.parametrize("run", RUNS)
def test_bad_step_is_skipped_everywhere_and_memories_stay_finite(job, run):
    runs = [r["runs"][run] for r in job]
    assert_identical_across_ranks(runs)
    for rank, r in enumerate(runs):
        assert r["skipped"] == 2, (rank, r["skipped"])
        assert r["unchanged"][NAN_STEP] and r["unchanged"][INF_STEP], rank
        assert not r["unchanged"][NAN_STEP - 1], "a normal step changed nothing"
        assert r["memory_finite"], f"rank {rank}: a memory holds NaN/Inf"
        assert all(bool(torch.isfinite(p).all()) for p in r["params"].values())


def test_raise_stops_every_rank_at_the_same_step_naming_the_culprit(job):
    errors = [r["runs"]["raise"]["error"] for r in job]
    assert [e[0] for e in errors] == [NAN_STEP, NAN_STEP]
    assert "another rank's gradient is non-finite" in errors[0][1]
    assert "this rank's gradient of 0.weight is non-finite" in errors[1][1]

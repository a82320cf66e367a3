"""Horovod's resume flow and ``broadcast_optimizer_state`` with this library's optimizer on
real ranks (2 under horovodrun --gloo, 4 under mpirun); a hang fails the test (timeout)."""
import pytest

from tests.multirank import assert_identical_across_ranks, run_ranks


@pytest.fixture(scope="module", params=[("gloo", 2), pytest.param(("mpirun", 4), marks=pytest.mark.slow)],
                ids=lambda p: f"{p[0]}-np{p[1]}")
def job(request, tmp_path_factory):
    launcher, np = request.param
    return run_ranks("resume_flow.py", np, launcher,
                     [str(tmp_path_factory.mktemp("resume_flow"))], timeout=300)


@pytest.mark.parametrize("flow", ["topk", "powersgd", "gravac"])
def test_rank_0_loads_every_rank_broadcasts_and_training_goes_on_identically(job, flow):
    runs = [r["flows"][flow] for r in job]
    assert_identical_across_ranks(runs)
    for rank, run in enumerate(runs):
        assert run["engine_unchanged_by_broadcast"], (flow, rank)
        assert run["state_entries"] > 0  # momentum everywhere after the broadcast
    assert runs[0]["steps"] == 3 + 6  # rank 0 resumed its step count


def test_broadcast_optimizer_state_in_every_case_and_for_every_optimizer(job):
    names = job[0]["optimizers"]
    assert {"Adam", "SGD", "RMSprop", "Adagrad", "ASGD"} <= set(names)
    for case in job[0]["cases"]:
        runs = [r["cases"][case] for r in job]
        assert_identical_across_ranks(runs)
        for rank, run in enumerate(runs):
            assert run["entries_as_root"] and run["state_as_root"], (case, rank)
            assert run["engine_unchanged_by_broadcast"], (case, rank)


def test_unnamed_parameters_get_horovods_names(job):
    assert job[0]["unnamed"] == ["allreduce.noname.0.0", "allreduce.noname.0.1",
                                 "allreduce.noname.1.0", "allreduce.noname.1.1"]
    assert all(r["unnamed"] == job[0]["unnamed"] for r in job)


def test_a_rank_that_skips_its_backward_exchanges_zeros_and_does_not_step_alone(job):
    runs = [r["skipped_backward"] for r in job]
    assert_identical_across_ranks(runs)
    assert all(r["steps"] == 3 for r in runs)

"""Horovod elastic (horovodrun --min-np/--max-np, Gloo) with DistributedOptimizer."""
import pytest
import torch

from tests.multirank import assert_identical_across_ranks, run_elastic

STEPS = 30


@pytest.fixture(scope="module")
def fixed():
    return run_elastic("elastic_train.py", 2, 2, 2, "localhost:2", ["fixed", str(STEPS)])


def test_fixed_size_elastic_run_keeps_residuals_per_rank_and_takes_the_agent_from_rank_0(fixed):
    reports = fixed
    assert_identical_across_ranks(reports)
    assert reports[0]["decisions"] == reports[1]["decisions"]
    assert len(set(reports[0]["decisions"])) >= 2
    for r in reports:
        assert r["residuals_kept"], "state.sync() overwrote this rank's residuals"
        assert r["agent_marker"] == 0, "the agent's state did not come from rank 0"
    assert reports[0]["residual_norm"] != reports[1]["residual_norm"]


@pytest.mark.slow
def test_two_failures_before_a_commit_roll_back_to_it_twice_and_end_like_an_undisturbed_run(
        fixed):
    whole = fixed
    failed = run_elastic("elastic_train.py", 2, 2, 2, "localhost:2", ["fail", str(STEPS)])
    assert all(r["failures"] == 2 and r["resets"] >= 2 for r in failed)
    assert_identical_across_ranks(failed)
    for key, value in whole[0]["params"].items():
        assert torch.equal(value, failed[0]["params"][key]), key


@pytest.mark.slow
def test_removed_worker_training_goes_on_with_the_rest():
    # Horovod 0.28.1's elastic driver sometimes never tells the workers of a host-list change
    # (seen once in ~10 runs here: 3,000 steps at the old size); one more job in that case —
    # the assertions are the same and a second miss fails.
    for _ in range(2):
        survivor, = run_elastic("elastic_train.py", 2, 1, 2, "localhost:2", ["remove", "60"],
                                reporting=[0])
        if survivor["sizes"][-1] == 1:
            break
    sizes = survivor["sizes"]
    assert sizes[0] == 2 and sizes[-1] == 1 and survivor["size"] == 1
    assert survivor["step_count"] >= 60
    assert all(bool(torch.isfinite(v).all()) for v in survivor["params"].values())

"""The multi-rank harness itself, with dense Horovod: both launchers, 2 and 4 ranks."""
import pytest

from tests.multirank import LAUNCHERS, MultiRankError, assert_identical_across_ranks, run_ranks


@pytest.mark.slow  # make test: tests/test_optimizer.py's dense run against Horovod's optimizer
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("np", [2, 4])
def test_dense_horovod_training_is_identical_on_all_ranks(launcher, np):
    reports = run_ranks("dense_smoke.py", np, launcher)
    assert [r["size"] for r in reports] == [np] * np
    assert_identical_across_ranks(reports)
    losses = reports[0]["losses"]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_failing_rank_fails_fast_with_its_output(launcher):
    with pytest.raises(MultiRankError, match="rank 1 fails on purpose"):
        run_ranks("fail_on_rank1.py", 2, launcher, timeout=60)

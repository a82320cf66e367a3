"""Soak: 4 ranks × 2,000 steps with GraVAC changing the CF — no memory growth, no open handles."""
import pytest

from tests.multirank import assert_identical_across_ranks, run_ranks

from horovod_gravac.agents import RECENT_STEPS

STEPS, WARMUP = 2000, 200


@pytest.mark.slow  # `make test-all`
def test_four_ranks_two_thousand_steps_memory_stable_and_no_pending_handles():
    reports = run_ranks("soak.py", 4, "mpirun", [str(STEPS)], timeout=900)
    assert_identical_across_ranks(reports)
    assert len(reports[0]["cfs"]) >= 3, f"the agent should have changed the CF: {reports[0]['cfs']}"
    for rank, r in enumerate(reports):
        assert r["open_handles"] == 0, f"rank {rank} left Horovod handles open"
        after = [mib for step, mib in r["rss"] if step >= WARMUP]
        assert max(after) <= 1.10 * after[0], f"rank {rank} RSS grew: {r['rss']}"
        assert r["decisions_len"] == min(STEPS, RECENT_STEPS)
    assert reports[0]["history_len"] == min(STEPS, RECENT_STEPS)

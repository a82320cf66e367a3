"""Checkpoint/resume with 2 real ranks: bit for bit, and refusals that say what to do."""
import pytest
import torch

from tests.multirank import run_ranks

CONFIGS = ("topk_static", "dgc_static", "powersgd", "topk_gravac", "dgc_gravac",
           "powersgd_gravac", "topk_gravac_cost", "topk_static_plan",
           "powersgd_gravac_plan", "codec_choice")
SPLIT, STEPS = 17, 40


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("checkpoints"))
    whole = run_ranks("resume_checks.py", 2, "mpirun", ["whole", directory])
    run_ranks("resume_checks.py", 2, "gloo", ["first", directory])
    resumed = run_ranks("resume_checks.py", 2, "gloo", ["resume", directory])
    converted = run_ranks("resume_checks.py", 3, "mpirun", ["convert", directory])
    return whole, resumed, converted


@pytest.mark.parametrize("name", CONFIGS)
def test_resumed_job_ends_bit_for_bit_like_the_uninterrupted_one(runs, name):
    whole, resumed, _ = runs
    for rank in range(2):
        a, b = whole[rank][name], resumed[rank][name]
        for key in a["params"]:
            assert torch.equal(a["params"][key], b["params"][key]), (name, rank, key)
        assert b["decisions"] == a["decisions"][SPLIT:], (name, rank)
    if name.endswith("gravac"):  # the agent kept changing its mind across the restart
        assert len(set(d[0] for d in whole[0][name]["decisions"][SPLIT:])) >= 2
    if name == "codec_choice":  # the switch came after the restart, at the same step
        assert [d[4] for d in whole[0][name]["decisions"]] == [0] * 20 + [1] * (STEPS - 20)
        assert whole[1][name]["decisions"] == whole[0][name]["decisions"]
    if name.endswith("plan"):  # the resumed plan went on sending per-tensor CFs
        assert any(d[3] for d in whole[0][name]["decisions"][SPLIT:]), name


def test_checkpoint_of_another_compressor_or_a_missing_file_is_refused_on_every_rank(runs):
    _, resumed, _ = runs
    for r in resumed:
        assert "compressor 'topk' (this job: 'dgc')" in r["wrong_compressor"]
        assert "convert=True" in r["wrong_compressor"]
        assert "no checkpoint at" in r["missing"]


def test_other_world_size_is_refused_then_converted_on_purpose(runs):
    _, _, converted = runs
    for r in converted:
        assert "world size 2 (this job: 3)" in r["wrong_size"]
        assert r["converted_step"] == SPLIT and r["residuals_after_convert"] == 0
    for r in converted[1:]:
        for key, value in r["after"]["params"].items():
            assert torch.equal(value, converted[0]["after"]["params"][key])
        assert r["after"]["decisions"] == converted[0]["after"]["decisions"]

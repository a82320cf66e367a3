"""horovod_gravac.ddp: the DDP communication hook under torchrun (Gloo), 2 and 4 ranks."""
import pytest
import torch

from tests.multirank import assert_identical_across_ranks, run_torchrun

STEPS, NAN_STEP = 40, 7
COMPRESSED = ("topk", "dgc", "powersgd", "gravac", "gravac_powersgd", "gravac_cost",
              "accordion", "plan", "static", "choice", "no_sync", "unused")


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def job(request):
    return run_torchrun("ddp_checks.py", request.param, [str(STEPS)], timeout=600)


def runs(job, name):
    return [r["runs"][name] for r in job]


def test_launched_by_torchrun_and_no_compression_equals_plain_ddp(job):
    """The same averages as DDP's own allreduce; not bit for bit: this library's buckets (a
    function of the model, so that resuming is exact) are not DDP's (rebuilt after the
    first step), and Gloo's ring sums each element in an order that depends on the buffer."""
    assert all(r["torchrun"] for r in job)
    for plain, none in zip(runs(job, "plain"), runs(job, "none")):
        for key, value in plain["params"].items():
            torch.testing.assert_close(value, none["params"][key], rtol=1e-5, atol=1e-6)
    assert_identical_across_ranks(runs(job, "plain"))
    assert_identical_across_ranks(runs(job, "none"))


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_training_ends_identical_on_every_rank(job, name):
    ranks = runs(job, name)
    assert_identical_across_ranks(ranks)
    assert all(torch.isfinite(v).all() for v in ranks[0]["params"].values())
    assert ranks[0]["bytes"] < ranks[0]["dense"]
    assert all(r["decisions"] == ranks[0]["decisions"] for r in ranks)
    assert not torch.equal(ranks[0]["params"]["body.0.weight"],
                           runs(job, "plain")[0]["params"]["body.0.weight"])


def test_a_state_made_before_ddp_wraps_the_model_works_like_register_comm_hook(job):
    for a, b in zip(runs(job, "topk"), runs(job, "prebuilt_state")):
        for key, value in a["params"].items():
            assert torch.equal(value, b["params"][key]), key


def test_agents_change_their_minds_identically(job):
    for name in ("gravac", "gravac_powersgd", "accordion", "plan", "choice"):
        decisions = runs(job, name)[0]["decisions"]
        assert len(decisions) == STEPS and len(set(decisions)) >= 2, (name, decisions[::5])


def test_codec_choice_switches_at_the_same_step_on_every_rank(job):
    decisions = [r["decisions"] for r in runs(job, "choice")]
    codecs = [d[4] for d in decisions[0]]
    assert codecs[:10] == [0] * 10 and codecs[10] in (1, 2), codecs  # TopK, then dense/fp16
    assert all(d == decisions[0] for d in decisions)


def test_no_sync_exchanges_once_per_accumulated_step(job):
    assert [r["exchanges"] for r in runs(job, "no_sync")] == [STEPS] * len(job)
    assert runs(job, "topk")[0]["exchanges"] == STEPS


def test_nonfinite_step_is_skipped_on_every_rank_or_raises_on_every_rank(job):
    for r in runs(job, "nan_skip"):
        assert r["skipped"] == 1 and r["steps"] == STEPS and r["memory_finite"]
    assert_identical_across_ranks(runs(job, "nan_skip"))
    errors = [r["errors"] for r in runs(job, "nan_raise")]
    assert all(len(e) == 1 and e[0][0] == NAN_STEP for e in errors), errors
    assert "this rank's gradient of" in errors[-1][0][1]
    assert "another rank's gradient is non-finite" in errors[0][0][1]


@pytest.mark.parametrize("continued", ["resumed_gravac", "reattached_gravac"])
def test_state_saved_with_torch_save_or_attached_again_goes_on_bit_for_bit(job, continued):
    for whole, resumed in zip(runs(job, "gravac"), runs(job, continued)):
        for key, value in whole["params"].items():
            assert torch.equal(value, resumed["params"][key]), key
        assert resumed["decisions"] == whole["decisions"][-len(resumed["decisions"]):]
        assert resumed["bytes"] == whole["bytes"] and resumed["steps"] == STEPS


def test_a_parameter_ddp_ignores_is_left_out(job):
    ranks = runs(job, "ignored_parameter")
    for r in ranks:
        assert not r["errors"] and r["steps"] == 5 and "head.bias" not in r["names"]
    # DDP leaves an ignored parameter to each rank (it trains on local gradients)
    assert_identical_across_ranks([{"params": {k: v for k, v in r["params"].items()
                                               if k != "head.bias"}} for r in ranks])


@pytest.mark.parametrize("spec", ["none", "topk:10", "powersgd", "qsgd", "randomk:4", "fp16"])
def test_fused_or_tensor_by_tensor_the_same_average_and_the_future_holds_it(job, spec):
    """This library's buckets (one here) or one per tensor: the same averaged gradient within
    float rounding; the future DDP waits for holds the averaged bucket, from which DDP
    writes p.grad (once)."""
    # fp16 sums round to 11 bits: one unit in the last place of the largest elements
    atol = 1e-4 if spec == "fp16" else 1e-6
    for rank in job:
        fused, alone = rank["fused"][spec]["fused"], rank["fused"][spec]["per_tensor"]
        assert fused["buckets"] == 1 and alone["buckets"] == len(alone["grads"])
        for key, value in fused["grads"].items():
            torch.testing.assert_close(value, alone["grads"][key], rtol=1e-5, atol=atol)
        assert fused["future_equals_grad"] and alone["future_equals_grad"]
    assert_identical_across_ranks([{"p": r["fused"][spec]["fused"]["grads"]} for r in job], "p")


def test_bad_arguments_raise_before_training(job):
    bad = job[0]["bad"]
    assert "compression factor" in bad["['compression']"]
    assert "does not have; use one of" in bad["['agent', 'compression']"]
    assert "on_nonfinite must be one of" in bad["['on_nonfinite']"]
    assert "min_compress_numel must be an integer >= 0, got -1" in bad["['min_compress_numel']"]
    assert "bucket_cap_mb must be a number > 0, got 0" in bad["['bucket_cap_mb']"]
    assert "match no parameter name" in bad["['compress_patterns']"]
    assert "must be a torch.nn.parallel.DistributedDataParallel" in bad["not ddp"]
    assert "static_graph=True) is not supported" in bad["static_graph"]
    assert "compression, bucket_cap_mb was given too" in bad["state and settings"]

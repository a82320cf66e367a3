"""The recipes (examples/*.py, docs/guides/horovod.md) run on 2 real ranks and end identical on every rank."""
import pytest
import torch

from tests.multirank import assert_identical_across_ranks, run_ranks
from horovod_gravac.compression import create, create_memory


def run(example):
    reports = run_ranks("example_runner.py", 2, "gloo", args=[example], timeout=300)
    assert_identical_across_ranks(reports)
    assert all(torch.isfinite(v).all() for v in reports[0]["params"].values())
    assert all(r["residuals_finite"] for r in reports)
    return reports


def test_mixed_precision_skips_the_overflow_and_residuals_follow_the_loss_scale():
    reports = run("amp.py")
    assert [r["skipped"] for r in reports] == [1, 1]  # the injected overflow, on both ranks
    # 2^16, grown at step 20, halved by the overflow at 30, grown again at 50 (interval 20)
    assert reports[0]["scale"] == 2.0 ** 17


@pytest.mark.slow
def test_gradient_accumulation_exchanges_once_per_step():
    reports = run("accumulation.py")
    assert [r["exchanges"] for r in reports] == [30, 30]


@pytest.mark.slow
def test_adamw_state_is_identical_on_every_rank():
    reports = run("adam.py")
    flat = [{"s": torch.cat([t.reshape(-1).double() for s in r["optimizer_state"].values()
                             for t in s.values() if torch.is_tensor(t)])} for r in reports]
    assert_identical_across_ranks(flat, "s")


@pytest.mark.slow
def test_what_not_to_compress_is_sent_dense_without_a_residual():
    reports = run("what_not_to_compress.py")
    dense = ["decoder.bias", "decoder.weight", "lstm.bias_ih_l0", "norm.bias", "norm.weight"]
    for r in reports:
        assert r["uncompressed"] == dense  # by pattern (decoder.*) and by size; bias_hh forced in
        assert not set(r["residual_names"]) & set(dense)
        assert {"embedding.weight", "lstm.bias_hh_l0"} <= set(r["residual_names"])
        sizes = {k: v.numel() for k, v in r["params"].items()}
        assert all(r["bytes_by_tensor"][name] == 4 * sizes[name] for name in dense)
        assert r["bytes_by_tensor"]["embedding.weight"] < sizes["embedding.weight"]


@pytest.mark.parametrize("name,memory", [("topk", "residual"), ("dgc", "dgc"),
                                         ("efsignsgd", "efsignsgd")])
def test_memories_rescale_everything_they_keep(name, memory):
    c = create(name)
    mem = create_memory(memory, c)
    g = torch.randn(200, generator=torch.Generator().manual_seed(0))
    compensated = mem.compensate(g, "w")
    payload, ctx = c.compress(compensated, "w", 0)
    mem.update("w", compensated, c, payload, ctx)
    kept = {k: v for k, v in mem.state_dict().items()
            if isinstance(v, dict) and v and all(torch.is_tensor(t) for t in v.values())}
    assert kept
    mem.rescale(0.5)
    for store, tensors in kept.items():
        for key, before in tensors.items():
            torch.testing.assert_close(mem.state_dict()[store][key], before * 0.5)

"""DistributedOptimizer under real multi-rank jobs (mpirun and horovodrun --gloo, 2 and 4 ranks)."""
import horovod.torch as hvd
import pytest
import torch

from horovod_gravac import compression as C
from tests.multirank import LAUNCHERS, assert_identical_across_ranks, run_ranks


def early_loss(losses):
    return sum(losses[:5]) / 5


def late_loss(losses):
    return sum(losses[-10:]) / 10


@pytest.fixture(scope="module", params=[
    # make test: 4 ranks under mpirun; make test-all: every launcher and size
    pytest.param((l, n), marks=pytest.mark.slow) if (l, n) != ("mpirun", 4)
    else (l, n) for l in LAUNCHERS for n in (2, 4)], ids=lambda p: f"{p[0]}-np{p[1]}")
def job(request):
    launcher, np = request.param
    return run_ranks("optimizer_checks.py", np, launcher, timeout=600)


def test_none_matches_horovod_distributed_optimizer(job):
    for rank in job:
        assert rank["results"]["none_vs_horovod"] < 1e-5
        assert rank["results"]["none_bytes_per_step"] == rank["results"]["dense_bytes_per_step"]


def test_topk_at_cf_1_equals_dense(job):
    assert job[0]["results"]["topk1_vs_none"] < 1e-5


def test_backward_passes_per_step(job):
    assert job[0]["results"]["bpps2_vs_horovod"] < 1e-5


@pytest.mark.parametrize("name", C.names())
def test_every_compressor_trains_and_ranks_agree(job, name):
    runs = [r["per_compressor"][name] for r in job]
    assert_identical_across_ranks(runs)
    losses = runs[0]["losses"]
    assert late_loss(losses) < 0.75 * early_loss(losses), (name, losses)
    if name not in ("none", "threshold"):
        assert runs[0]["bytes"] < runs[0]["dense_bytes"], name


@pytest.mark.parametrize("name", C.names())
def test_every_compressor_averages_the_same_fused_or_tensor_by_tensor(job, name):
    """One collective per kind for the whole model, or one per tensor: the same averaged
    gradient (within float rounding: Gloo's and MPI's sums run over other buffers)."""
    for rank in job:
        (one, fused), (four, alone) = (rank["fused"][name][k] for k in ("fused", "per_tensor"))
        assert (one, four) == (1, 4)
        for key in fused:
            torch.testing.assert_close(fused[key], alone[key], rtol=1e-5, atol=1e-6)
    reference = job[0]["fused"][name]["fused"][1]
    for rank in job[1:]:
        for key, value in rank["fused"][name]["fused"][1].items():
            assert torch.equal(value, reference[key]), (name, key)


def test_whole_model_granularity_and_unused_parameter(job):
    for key in ("whole", "unused"):
        assert_identical_across_ranks([{"p": r["params"][key]} for r in job], "p")
    r = job[0]
    assert late_loss(r["results"]["model_granularity_losses"]) < 0.75 * early_loss(
        r["results"]["model_granularity_losses"])
    assert late_loss(r["unused_losses"]) < 0.75 * early_loss(r["unused_losses"])
    assert r["state_keys"] == ["agent", "communication", "compressor", "decision", "memory", "skipped_steps",
                            "step"]


@pytest.fixture(scope="module")
def single_rank():
    hvd.init()
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("kwargs,message", [
    ({"compression": "nope"}, "unknown compressor 'nope'"),
    ({"compression": "topk:0.5"}, "compression factor.* must be"),
    ({"compression": 3}, "compression spec must be"),
    ({"backward_passes_per_step": 0}, "backward_passes_per_step must be an integer >= 1"),
    ({"backward_passes_per_step": 1.5}, "backward_passes_per_step must be an integer >= 1, got 1.5"),
    ({"op": hvd.Adasum, "compression": "topk:10"}, "Adasum is not supported"),
    ({"op": "mean"}, "op must be"),
    ({"gradient_predivide_factor": 0}, "gradient_predivide_factor must be a number > 0, got 0"),
    ({"gradient_predivide_factor": "2"}, "gradient_predivide_factor must be a number > 0, got '2'"),
    ({"on_nonfinite": "zero"}, r"on_nonfinite must be one of \('skip', 'raise'\), got 'zero'"),
    ({"agent": "gravac", "compression": "qsgd"}, "does not have; use one of"),
    ({"agent": "sometimes", "compression": "topk"}, "unknown agent 'sometimes'"),
    ({"gradient_predivide_factor": 2.0, "op": hvd.Sum}, "not supported with op != Average"),
    ({"granularity": "bucket"}, "granularity must be one of"),
    ({"memory": "dgc", "compression": "qsgd"}, "needs a sparsifier"),
    ({"groups": 0}, "groups must be an integer >= 1, got 0"),
    ({"groups": "all"}, "groups must be None, an integer >= 1 or a list of lists"),
    ({"groups": [[torch.zeros(2)]]}, r"groups\[0\] holds a tensor that is not a parameter"),
    ({"groups": [[1.0]]}, r"groups\[0\] must be a list of parameters"),
    ({"groups": 2, "granularity": "model"}, "groups is meaningless with granularity='model'"),
    ({"num_groups": -1}, "num_groups must be an integer >= 0, got -1"),
    ({"sparse_as_dense": "yes"}, "sparse_as_dense must be True or False, got 'yes'"),
    ({"min_compress_numel": -1}, "min_compress_numel must be an integer >= 0, got -1"),
    ({"compress_patterns": {"wieght": False}}, r"compress_patterns \['wieght'\] match no "
                                                "parameter name .names look like: weight, bias"),
    ({"compress_patterns": {"*": "no"}}, "must map name patterns .str. to True .compress. or False"),
    ({"compress_patterns": ["*.bias"]}, "compress_patterns must map name patterns to True/False"),
])
def test_bad_arguments_raise_at_construction(single_rank, kwargs, message):
    import horovod_gravac as hg
    model, opt = single_rank
    with pytest.raises(ValueError, match=message):
        hg.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **kwargs)


def test_small_tensors_are_sent_dense_unless_a_pattern_says_otherwise():
    from horovod_gravac.compression import uncompressed_tensors
    sizes = [("enc.weight", 5000), ("enc.bias", 100), ("dec.weight", 5000), ("dec.bias", 100)]
    assert uncompressed_tensors(sizes, 1024) == {"enc.bias", "dec.bias"}
    assert uncompressed_tensors(sizes, 0) == set()
    # first match wins: dec.bias is compressed by the first pattern, dec.weight kept dense
    assert uncompressed_tensors(sizes, 1024, {"dec.bias": True, "dec.*": False}) == {
        "enc.bias", "dec.weight"}
    assert uncompressed_tensors(sizes, 1024, {"dec.*": False, "dec.bias": True}) == {
        "enc.bias", "dec.weight", "dec.bias"}


def test_bad_optimizer_and_names(single_rank):
    import horovod_gravac as hg
    model, opt = single_rank
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        hg.DistributedOptimizer(model)
    with pytest.raises(ValueError, match="unique"):
        hg.DistributedOptimizer(opt, named_parameters=[("w", model.weight), ("w", model.bias)])
    with pytest.raises(ValueError, match="missing from named_parameters"):
        hg.DistributedOptimizer(opt, named_parameters=[("w", model.weight)])


def test_is_a_subclassable_optimizer(single_rank):
    import horovod_gravac as hg
    model, opt = single_rank

    class Mine(hg.DistributedOptimizer):
        pass

    wrapped = Mine(opt, named_parameters=model.named_parameters(), compression="topk:2")
    assert isinstance(wrapped, hg.DistributedOptimizer)
    assert isinstance(wrapped, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(wrapped, 1, gamma=0.5)
    model(torch.randn(3, 4)).sum().backward()
    wrapped.step()
    sched.step()
    assert wrapped.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("sparse,sparse_as_dense", [(False, False), (True, False), (True, True)])
def test_embedding_gradients_sparse_or_dense(single_rank, sparse, sparse_as_dense):
    import horovod_gravac as hg
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=sparse)
    base = torch.optim.SparseAdam(emb.parameters(), lr=0.1) if sparse \
        else torch.optim.SGD(emb.parameters(), lr=0.5)
    opt = hg.DistributedOptimizer(base, named_parameters=emb.named_parameters(),
                                  compression="topk:4", sparse_as_dense=sparse_as_dense)
    tokens = torch.tensor([1, 2, 3, 2])
    before = emb.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        emb(tokens).pow(2).sum().backward()
        opt.step()  # SparseAdam refuses dense gradients: they must come back sparse
        assert emb.weight.grad.is_sparse == sparse
    changed = (emb.weight.detach() != before).any(dim=1).nonzero().view(-1).tolist()
    assert changed and set(changed) <= {1, 2, 3}
    assert opt.communication.steps == 3
    if sparse and not sparse_as_dense:  # exchanged as Horovod does: uncompressed, 3 rows
        assert opt.communication.last_bytes == 3 * 8 + 3 * 8 * 4  # int64 indices + values
    else:
        assert not opt.memory.residuals or "weight" in opt.memory.residuals


def record_collectives(monkeypatch):
    """Every Horovod collective the optimizer starts, as (function, name, elements)."""
    calls = []
    for fn in ("allreduce_async_", "allgather_async", "broadcast_async_", "allreduce",
               "allgather", "broadcast", "grouped_allreduce_async_", "grouped_allgather_async",
               "alltoall_async"):
        real = getattr(hvd, fn)
        monkeypatch.setattr(hvd, fn, lambda tensor, *a, _real=real, _fn=fn, **kw: (
            calls.append((_fn, kw.get("name"), sum(t.numel() for t in tensor)
                          if isinstance(tensor, list) else tensor.numel())),
            _real(tensor, *a, **kw))[1])
    return calls


def test_groups_travel_as_one_fused_collective_per_kind(single_rank, monkeypatch):
    import horovod_gravac as hg
    calls = record_collectives(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 2))
    for compression, kind in (("none", "grouped_allreduce_async_"),
                              ("topk:4", "allgather_async")):
        calls.clear()
        opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      named_parameters=model.named_parameters(),
                                      compression=compression, groups=[list(model[0].parameters())],
                                      min_compress_numel=0)  # tiny layers: compress them too
        # backward order: the last layer's tensors first
        assert opt.engine.layout.buckets == (("1.bias",), ("1.weight",), ("0.weight", "0.bias"))
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
        # layer 0's weight and bias in one collective; layer 1's tensors alone
        assert [c[0] for c in calls] == [kind] * 3, calls
        suffix = "sum.torch.float32" if compression == "none" else "gather"
        assert calls[-1][1] == f"{opt.engine.label}.b2.r0.{suffix}"
        if compression == "none":
            assert sorted(c[2] for c in calls) == [2, 16, 48 + 8]
        for h in opt._hooks:
            h.remove()
    with pytest.warns(DeprecationWarning, match="num_groups is deprecated"):
        opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      named_parameters=model.named_parameters(), num_groups=2)
    assert len(opt.engine.layout.buckets) == 2


@pytest.mark.parametrize("compression,rounds", [("topk", 1), ("powersgd", 2)])
def test_collectives_per_step_are_buckets_times_rounds_and_statistics_ride_along(
        single_rank, monkeypatch, compression, rounds):
    """B buckets, a compressor of R rounds: B·R data collectives a step and none for the
    agent's statistics (they ride in the last bucket's); the decision's broadcast is the
    only other one (over MPI when Horovod runs on MPI)."""
    import horovod_gravac as hg
    calls = record_collectives(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(),
                                torch.nn.Linear(300, 300), torch.nn.ReLU(),
                                torch.nn.Linear(300, 40))
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                  named_parameters=model.named_parameters(),
                                  compression=compression, min_compress_numel=0,
                                  agent=hg.agents.GraVAC(theta_min=2, theta_max=20, window=3,
                                                         settle_steps=0),
                                  bucket_cap_mb=0.1)
    buckets = len(opt.engine.layout.buckets)
    assert buckets == 3
    for _ in range(5):
        calls.clear()
        opt.zero_grad()
        model(torch.randn(16, 64)).pow(2).mean().backward()
        opt.step()
        control = [c for c in calls if c[1] == f"{opt.engine.label}.decision"]
        data = [c for c in calls if c not in control]
        assert len(data) == buckets * rounds, calls
        assert all(c[0] in ("grouped_allreduce_async_", "allgather_async") for c in data), calls
        assert all(c[0] == "broadcast_async_" for c in control) and len(control) <= 1


def test_two_stage_quantizers_send_an_alltoall_then_an_allgather_per_bucket(
        single_rank, monkeypatch):
    """On one rank too: round 1 an alltoall of the chunks, round 2 an allgather of the
    owner's, per bucket; what Horovod carries is what expected_rounds says."""
    import horovod_gravac as hg
    calls = record_collectives(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(),
                                torch.nn.Linear(300, 40))
    for spec in ("8bit", "qsgd:bucket_size=64", "natural", "onebit"):
        opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                      named_parameters=model.named_parameters(),
                                      compression=f"{spec},exchange=two_stage" if ":" in spec
                                      else f"{spec}:exchange=two_stage", bucket_cap_mb=0.05)
        # a bucket of both kinds (the biases go dense) and one of the first weight alone
        assert opt.engine.layout.buckets == (("2.bias", "2.weight", "0.bias"), ("0.weight",))
        for _ in range(2):
            calls.clear()
            opt.zero_grad()
            model(torch.randn(16, 64)).pow(2).mean().backward()
            opt.step()
            kinds = sorted(c[0] for c in calls)
            assert kinds == ["allgather_async"] * 2 + ["alltoall_async"] * 2 + [
                "grouped_allreduce_async_"], calls
            for name in ("0.weight", "2.weight"):
                shape = opt.engine.shapes[name]
                (first, _), (second, _) = opt.compressor.expected_rounds(shape)
                sent = [c[2] for c in calls if c[0] == "alltoall_async"]
                assert first in sent, (spec, name, first, sent)
                assert opt.communication.last_step[name] == first + second
        assert set(opt.compressor.owner_residuals) == {"0.weight", "2.weight"}
        for h in opt._hooks:
            h.remove()


HOST_SYNCS = ("item", "tolist", "__bool__", "cpu", "numpy")


@pytest.mark.parametrize("compression", ["none", "fp16", "topk:20", "randomk:20", "dgc:20",
                                         "powersgd", "8bit:exchange=two_stage",
                                         "onebit:exchange=two_stage",
                                         "qsgd:exchange=two_stage",
                                         "natural:exchange=two_stage"])
def test_no_host_sync_in_backward_and_one_per_step(single_rank, compression, monkeypatch):
    """Counts the calls that read device values back to the host, with compressors on the
    path they take on accelerators (a CPU tensor would let them use data-dependent sizes)."""
    import horovod_gravac as hg
    from horovod_gravac.compression import base
    monkeypatch.setattr(base, "HOST_DEVICES", frozenset())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(),
                                torch.nn.Linear(300, 40))
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                  named_parameters=model.named_parameters(),
                                  compression=compression)
    counts = {"backward": 0, "step": 0}
    phase = ["idle"]
    for method in HOST_SYNCS:
        real = getattr(torch.Tensor, method)

        def counted(self, *a, _real=real, **kw):
            if phase[0] in counts:
                counts[phase[0]] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, method, counted)
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.randn(16, 64)).pow(2).mean()
        phase[0] = "backward"
        loss.backward()
        phase[0] = "step"
        opt.step()
        phase[0] = "idle"
    assert counts == {"backward": 0, "step": 3}, counts


GRAD_W = [10.0, -9.0, 8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
RESIDUAL_W = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, -6.0, 7.0]
GRAD_B = [3.0, 4.0]  # no residual
# g_o = g + e = [10, -9, 8, 1, 1, 1, 1, 6, -5, 8]. θmin = 2 keeps 5 of w's 10 (1 of b's 2),
# the candidate 5 keeps 2 of w's (1 of b's). Terms: (reference, θmin level, candidate level).
EXPECTED_GAIN_TERMS = {
    "fresh": (252 + 25, 247 + 16, 181 + 16),          # ‖g‖², ‖C(g)‖², ‖C(C(g))‖²
    "error_fed": (374 + 25, 345 + 16, 181 + 16),      # the same on g_o
    "authors": (252 ** 0.5 + 5, 345 ** 0.5 + 4, 181 ** 0.5 + 4),  # Σ‖·‖: C(g_o) over g
}


def step_on_constructed_gradients(residual_w=None, **gravac):
    """One step of w (10 elements) and b (2) with gradients GRAD_W and GRAD_B under a GraVAC
    made with ``gravac``: (the statistics its agent saw, the optimizer, w, b)."""
    import horovod_gravac as hg

    class Recording(hg.agents.GraVAC):
        def decide(self, stats):
            self.seen = stats
            return super().decide(stats)

    w = torch.zeros(10, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    agent = Recording(**{"settle_steps": 0, **gravac})  # settle steps are not measured
    opt = hg.DistributedOptimizer(torch.optim.SGD([w, b], lr=1.0), named_parameters=[
        ("w", w), ("b", b)], compression="topk", agent=agent, min_compress_numel=0)
    if residual_w is not None:
        opt.memory.residuals["w"] = torch.tensor(residual_w)
    ((w * torch.tensor(GRAD_W)).sum() + (b * torch.tensor(GRAD_B)).sum()).backward()
    opt.step()
    return agent.seen, opt, w, b


@pytest.mark.parametrize("gain", sorted(EXPECTED_GAIN_TERMS))
def test_gain_terms_on_constructed_gradients_and_what_is_sent_does_not_depend_on_them(
        single_rank, gain):
    s, opt, w, _ = step_on_constructed_gradients(RESIDUAL_W, theta_min=2, theta_max=10,
                                                 theta_s=2.5, window=100, gain=gain,
                                                 search="throughput")
    assert s.gain_measured
    assert (s.gain_reference, s.gain_min, s.gain_compressed) == pytest.approx(
        EXPECTED_GAIN_TERMS[gain], rel=1e-6)
    # the warm-up sends C(g_o, θmin) with error feedback, whatever the gain measures
    assert w.detach().tolist() == [-10.0, 9.0, -8.0, 0.0, 0.0, 0.0, 0.0, -6.0, 0.0, -8.0]
    assert opt.memory.residuals["w"].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, -5.0, 0.0]


def test_cost_model_search_measures_every_ladder_cf_within_the_theta_min_selection(single_rank):
    s, opt, _, _ = step_on_constructed_gradients(theta_min=2, theta_max=10, theta_s=2.5,
                                                 window=100, search="cost_model")
    assert opt.agent.ladder == (2, 4, 8, 10)
    # fresh ‖C(g, c)‖² per ladder CF: w keeps 5, 2, 1, 1 of its 10, b always 1 of its 2
    assert s.gain_ladder == pytest.approx({2: 247 + 16, 4: 181 + 16, 8: 100 + 16, 10: 100 + 16})
    # one rank: no link traffic, whatever the CF (a ring of one sends nothing)
    assert s.ladder_link_bytes == {2: 0.0, 4: 0.0, 8: 0.0, 10: 0.0} and s.link_bytes == 0.0
    assert s.wait_time >= 0.0 and s.iter_time >= s.wait_time


def test_a_tensor_is_sent_at_its_own_cf(single_rank):
    import horovod_gravac as hg

    _, opt, w, b = step_on_constructed_gradients(theta_min=2, theta_max=10, window=100,
                                                 search="cost_model")
    # a decision with per-tensor CFs (a layer plan's): w is sent at CF 5 (2 of 10 kept), b at the decision's 2
    # — measured (levels within θmin's) or not (one compression at the CF sent): the same
    for measure in (True, False):
        opt.decision = hg.agents.Decision(cf=2, theta_min=2, layer_cf={"w": 5.0},
                                          measure_gain=measure)
        opt.memory.reset("w")
        opt.memory.reset("b")
        w.grad = torch.tensor(GRAD_W)
        b.grad = torch.tensor(GRAD_B)
        opt.synchronize()
        assert w.grad.tolist() == [10.0, -9.0] + [0.0] * 8 and b.grad.tolist() == [0.0, 4.0]


def test_untimed_work_is_not_part_of_the_step_time(single_rank):
    import time

    import horovod_gravac as hg

    class Recording(hg.agents.GraVAC):
        def decide(self, stats):
            self.times.append(stats.iter_time)
            return super().decide(stats)

    agent = Recording(window=100)
    agent.times = []
    w = torch.zeros(1000, requires_grad=True)
    opt = hg.DistributedOptimizer(torch.optim.SGD([w], lr=0.1), named_parameters=[("w", w)],
                                  compression="topk", agent=agent)
    for _ in range(3):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
        with opt.untimed():
            time.sleep(0.3)  # an evaluation
    assert max(agent.times[1:]) < 0.2, agent.times


def test_step_after_synchronize_warns_and_steps_once_like_horovod(single_rank):
    import horovod_gravac as hg
    w = torch.zeros(4, requires_grad=True)
    opt = hg.DistributedOptimizer(torch.optim.SGD([w], lr=1.0), named_parameters=[("w", w)],
                                  compression="topk:2", min_compress_numel=0)
    (w * torch.tensor([4.0, -3.0, 2.0, 1.0])).sum().backward()
    opt.synchronize()
    with pytest.warns(UserWarning, match="skip_synchronize"):
        opt.step()
    assert w.detach().tolist() == [-4.0, 3.0, 0.0, 0.0]  # one exchange, one update
    assert opt.communication.steps == 1


def test_step_callbacks_report_bytes_decisions_and_gains_and_can_be_removed(single_rank):
    import horovod_gravac as hg
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    agent = hg.agents.GraVAC(theta_min=2, theta_max=32, window=3, settle_steps=0)
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                  named_parameters=model.named_parameters(),
                                  compression="topk", agent=agent, min_compress_numel=0)
    reports = []
    handle = opt.register_step_callback(reports.append)
    for step in range(8):
        opt.zero_grad()
        loss = model(torch.randn(8, 16)).pow(2).mean()
        if step == 5:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        report = reports[-1]
        assert isinstance(report, hg.StepReport) and report.step == step
        assert report.bytes == opt.communication.last_bytes and 0 < report.bytes < report.dense_bytes
        assert report.decision == opt.decisions[-1] and report.next_decision == opt.decision
        assert report.skipped == (step == 5)
        if step == 5:
            assert report.stats is None and report.agent_row == {}
        else:
            assert report.stats.gain_reference > 0 and report.agent_row["step"] == step
            assert {"delta_min", "delta_c"} <= set(report.agent_row)
    handle.remove()
    opt.zero_grad()
    model(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    assert len(reports) == 8


def test_skipped_steps_and_cf_changes_are_logged(single_rank, caplog):
    import logging
    import horovod_gravac as hg
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8)
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                  named_parameters=model.named_parameters(), compression="topk",
                                  agent=hg.agents.GraVAC(theta_min=2, theta_max=64, window=2,
                                                         settle_steps=0, epsilon=0.01,
                                                         search="throughput"),
                                  min_compress_numel=0)
    with caplog.at_level(logging.INFO, logger="horovod_gravac"):
        for step in range(8):
            opt.zero_grad()
            loss = model(torch.randn(4, 64)).pow(2).mean()
            (loss * (float("inf") if step == 3 else 1.0)).backward()
            opt.step()
    messages = [r.getMessage() for r in caplog.records]
    assert any("step 3: the averaged gradient is not finite (this rank's" in m for m in messages)
    assert any("gravac sends CF" in m for m in messages), messages

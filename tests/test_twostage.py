"""The two-stage compressed allreduce of quantizers, N ranks simulated in one process.

The simulation does what the engine does, through the same wire format: every rank's
chunks packed a row per rank (``pack_rows``), rank j's alltoall result is row j of every
rank's buffer, each owner's ``next_round``, then every rank's ``aggregate`` of the gathered
owners' payloads.
"""
import pytest
import torch

from horovod_gravac import compression as C
from horovod_gravac.compression.twostage import valid_counts
from horovod_gravac.engine import EngineConfig
from horovod_gravac.transport import align, link_bytes, pack, pack_rows, unpack_rows

TWO_STAGE = ["8bit", "qsgd", "natural", "onebit"]


def ranks(spec, size, **params):
    """One compressor per simulated rank, bound as the engine binds them."""
    out = []
    for rank in range(size):
        c = C.create(spec, exchange="two_stage", **params)
        c.bind(rank, size)
        out.append(c)
    return out


def exchange(compressors, grads, memories=None, name="w", step=0):
    """Every rank's result (the sum over ranks) of one two-stage exchange of ``grads``."""
    size = len(compressors)
    memories = memories or [C.Memory() for _ in range(size)]
    sent = []
    for c, m, g in zip(compressors, memories, grads):
        compensated = m.compensate(g, name)
        payload, ctx = c.compress(compensated, name, step)
        assert ctx.exchange is C.Exchange.ALLTOALL and ctx.rounds == 2
        assert all(t.shape[0] == size for t in payload)
        sent.append((compensated, payload, ctx))
    buffers = [pack_rows(p, size) for _, p, _ in sent]
    dtypes = [t.dtype for t in sent[0][1]]
    counts = [t.numel() // size for t in sent[0][1]]
    owners = []
    for j, (c, m, (compensated, _, ctx)) in enumerate(zip(compressors, memories, sent)):
        received = torch.stack([b[j] for b in buffers])  # row i from rank i
        owner = c.next_round(tuple(unpack_rows(received, dtypes, counts)), ctx)
        assert ctx.exchange is C.Exchange.ALLGATHER
        m.update(name, compensated, c, owner, ctx)  # the engine's residual at the last round
        owners.append(owner)
    gathered = [tuple(t.reshape(-1) for t in o) for o in owners]
    return [c.aggregate(gathered, ctx) for c, (_, _, ctx) in zip(compressors, sent)]


def owner_residual(compressors, name, numel):
    """The owners' residuals as one tensor of ``numel`` elements (chunk j from rank j)."""
    return torch.cat([c.owner_residuals[name] for c in compressors]).view(-1)[:numel]


# -- chunks -------------------------------------------------------------------------------
@pytest.mark.parametrize("numel", [0, 1, 7, 17, 64, 1001, 4099])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("multiple", [1, 8, 24])
def test_chunks_cover_the_tensor_in_order_from_numel_and_size_alone(numel, size, multiple):
    bounds = C.chunk_bounds(numel, size, multiple)
    width = C.chunk_width(numel, size, multiple)
    assert len(bounds) == size and width % multiple == 0 and width * size >= numel
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 <= stop - start <= width for start, stop in bounds)
    assert width < max(1, -(-numel // size)) + multiple  # no more padding than a multiple
    counts = valid_counts(size, 0, numel, width, torch.device("cpu")).tolist()
    assert counts == [stop - start for start, stop in bounds]


# -- exact where the quantizers are lossless ----------------------------------------------
@pytest.mark.parametrize("size", [2, 3, 4])
def test_8bit_two_stage_equals_the_dense_sum_on_its_grid(size):
    """Integers with a 127 in every chunk of every rank (and 0 there on the others) and sums
    within ±127: both quantizations are exact, so is the result; both residuals are 0."""
    n = 1001  # not divisible by 2, 3, 4
    gen = torch.Generator().manual_seed(size)
    grads = [torch.randint(-(127 // size), 127 // size + 1, (n,), generator=gen).float()
             for _ in range(size)]
    for start, _ in C.chunk_bounds(n, size):
        for i in range(size):
            for k, g in enumerate(grads):
                g[start + i] = 127.0 if k == i else 0.0
    memories = [C.ResidualMemory() for _ in range(size)]
    compressors = ranks("8bit", size)
    results = exchange(compressors, grads, memories)
    dense = torch.stack(grads).sum(0)
    for r in results:
        assert torch.equal(r, dense)
    assert all(not m.residuals["w"].any() for m in memories)
    assert not owner_residual(compressors, "w", n).any()


@pytest.mark.parametrize("size", [2, 3, 5])
def test_natural_two_stage_equals_the_dense_sum_of_disjoint_powers_of_two(size):
    """Powers of two are never rounded; with one rank non-zero per element, neither is the sum."""
    n = 777
    gen = torch.Generator().manual_seed(0)
    owner = torch.randint(0, size, (n,), generator=gen)
    values = torch.ldexp(torch.ones(n), torch.randint(-12, 12, (n,), generator=gen))
    values *= torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    grads = [torch.where(owner == i, values, torch.zeros(n)) for i in range(size)]
    grads[0][5] = 0.0  # and a zero everywhere
    results = exchange(ranks("natural", size), grads)
    for r in results:
        assert torch.equal(r, torch.stack(grads).sum(0))


@pytest.mark.parametrize("size", [2, 3, 4])
def test_onebit_two_stage_is_exact_for_two_values_per_chunk(size):
    """Every rank sends the same tensor of one positive and one negative value per chunk:
    the means are those values, the owner's sum N·x again two values per chunk."""
    n = 203
    x = torch.empty(n)
    for j, (start, stop) in enumerate(C.chunk_bounds(n, size)):
        signs = torch.arange(stop - start) % 3 == 0
        x[start:stop] = torch.where(signs, 2.0 ** -(j + 1), -(2.0 ** j))
    memories = [C.ResidualMemory() for _ in range(size)]
    compressors = ranks("onebit", size)
    for r in exchange(compressors, [x.clone() for _ in range(size)], memories):
        assert torch.equal(r, x * size)
    assert not owner_residual(compressors, "w", n).any()
    assert all(not m.residuals["w"].any() for m in memories)


# -- within each quantizer's bound --------------------------------------------------------
def _chunks_of(t, size, multiple=8):
    return [t[a:b] for a, b in C.chunk_bounds(t.numel(), size, multiple)]


@pytest.mark.parametrize("size", [2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 17, 1001])
def test_8bit_and_qsgd_errors_stay_within_a_level_of_each_stage(size, n):
    """8-bit rounds to nearest: ≤ half a step (max/127) per stage; QSGD rounds
    stochastically: < one level (norm/s) per stage."""
    gen = torch.Generator().manual_seed(n * size)
    grads = [torch.randn(n, generator=gen) * (1 + i) for i in range(size)]
    dense = torch.stack(grads).sum(0)
    for spec, levels in (("8bit", 127), ("qsgd", 127), ("qsgd", 16)):
        params = {"levels": levels} if spec == "qsgd" else {}
        results = exchange(ranks(spec, size, **params), grads)
        for start, stop in C.chunk_bounds(n, size):
            if start == stop:
                continue
            parts = [g[start:stop] for g in grads]
            if spec == "8bit":  # the owner's max: at most the sum's plus the first errors
                first = sum(p.abs().max() for p in parts) / 254
                owner = (dense[start:stop].abs().max() + first) / 254
            else:  # ‖decoded‖ ≤ ‖x‖ + √w·‖x‖/s per rank
                norms = sum(torch.linalg.vector_norm(p) for p in parts)
                first = norms / levels
                owner = (torch.linalg.vector_norm(dense[start:stop]) +
                         norms * (1 + (stop - start) ** 0.5 / levels)) / levels
            bound = first + owner + 1e-5
            for r in results:
                assert (r[start:stop] - dense[start:stop]).abs().max() <= bound, (spec, levels)
        assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("spec", ["qsgd", "natural"])
def test_stochastic_two_stage_exchanges_stay_unbiased(spec):
    """Both roundings are unbiased (a fresh owner residual each trial: its first step)."""
    size, n, trials = 3, 50, 500
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=gen) for _ in range(size)]
    dense = torch.stack(grads).sum(0).double()
    samples = torch.stack([exchange(ranks(spec, size), grads, step=t)[0]
                           for t in range(trials)]).double()
    assert samples.std(0).max() > 0  # it does round at random
    error = (samples.mean(0) - dense).abs()
    assert (error <= 5 * samples.std(0) / trials ** 0.5 + 1e-6).all()
    assert error.mean() < 0.05 * dense.abs().mean()


@pytest.mark.parametrize("spec", TWO_STAGE)
@pytest.mark.parametrize("size,n", [(2, 1001), (3, 17), (4, 333)])
def test_error_feedback_of_both_stages_keeps_everything_that_was_not_sent(spec, size, n):
    """Σ_t result_t + Σ_ranks residual_T + the owners' residuals_T = Σ_t Σ_ranks g_t:
    what either quantization dropped is in a residual, and comes back."""
    gen = torch.Generator().manual_seed(size)
    compressors = ranks(spec, size)
    memories = [C.ResidualMemory() for _ in range(size)]
    sent, total = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for step in range(12):
        grads = [torch.randn(n, generator=gen) for _ in range(size)]
        total += torch.stack(grads).double().sum(0)
        results = exchange(compressors, grads, memories, step=step)
        sent += results[0].double()
        assert all(torch.equal(r, results[0]) for r in results)
    kept = sum(m.residuals["w"].double() for m in memories)
    kept = kept + owner_residual(compressors, "w", n).double()
    torch.testing.assert_close(sent + kept, total, rtol=0, atol=1e-4)
    assert owner_residual(compressors, "w", n).abs().sum() > 0


@pytest.mark.parametrize("spec", TWO_STAGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (33, 17), (8, 3, 3, 3)])
def test_shapes_dtypes_and_non_contiguous_inputs(spec, dtype, shape):
    size = 3
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(size)]
    results = exchange(ranks(spec, size), grads)
    for r in results:
        assert r.shape == grads[0].shape and r.dtype == dtype and torch.isfinite(r).all()
    base = torch.randn(40, 30, generator=gen)
    a = exchange(ranks(spec, 2), [base.t(), base.t() * 2])
    b = exchange(ranks(spec, 2), [base.t().contiguous(), base.t().contiguous() * 2])
    torch.testing.assert_close(a[0], b[0])


# -- NaN/Inf --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", TWO_STAGE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 500, 1000])
def test_a_non_finite_gradient_on_one_rank_reaches_every_rank_and_no_residual(spec, bad, where):
    size, n = 3, 1001
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for _ in range(size)]
    grads[1][where] = bad
    compressors = ranks(spec, size)
    for c in compressors:  # a residual from an earlier step, which must survive
        c.owner_residuals["w"] = torch.ones(C.chunk_width(n, size, c.chunk_multiple))
    culprit, _ = compressors[1].compress(grads[1], "w", 0)
    assert not C.payload_is_finite(culprit)  # the engine resets this rank's residual
    for r in exchange(compressors, grads):
        assert not torch.isfinite(r).all(), f"{spec} hid a {bad}"
    for c in compressors:
        assert torch.isfinite(c.owner_residuals["w"]).all()
    owner = next(j for j, (a, b) in enumerate(C.chunk_bounds(n, size)) if a <= where < b)
    assert torch.equal(compressors[owner].owner_residuals["w"],
                       torch.ones_like(compressors[owner].owner_residuals["w"]))


# -- settings, bytes, state -----------------------------------------------------------------
@pytest.mark.parametrize("spec", TWO_STAGE)
def test_exchange_is_validated_when_the_compressor_is_made(spec):
    for bad in ("ring", "", 2, None, "TWO_STAGE"):
        with pytest.raises(ValueError, match=r"exchange of compressor .* must be one of "
                                             r"'auto', 'allgather', 'two_stage'.*got"):
            C.create(spec, exchange=bad)
    with pytest.raises(ValueError, match="got 'ring'"):
        EngineConfig.create(f"{spec}:exchange=ring")
    assert C.create(f"{spec}:exchange=two_stage").exchange_mode == "two_stage"


@pytest.mark.parametrize("spec", ["signsgd", "signum", "efsignsgd", "terngrad", "topk",
                                  "powersgd", "fp16"])
def test_compressors_without_a_two_stage_exchange_refuse_it(spec):
    with pytest.raises(ValueError, match=f"compressor '{spec}' has no choice of exchange.*"
                                         "8bit, natural, onebit, qsgd"):
        C.create(spec, exchange="two_stage")


@pytest.mark.parametrize("spec", TWO_STAGE)
def test_auto_exchanges_in_two_stages_from_five_ranks(spec):
    c = C.create(spec)
    assert c.exchange_mode == "auto"
    for size, two in ((1, False), (2, False), (4, False), (5, True), (64, True)):
        c.bind(0, size)
        assert c.two_stage is two
        _, ctx = c.compress(torch.randn(100), "w")
        assert ctx.rounds == (2 if two else 1)
    c = C.create(spec, exchange="allgather")
    c.bind(0, 64)
    assert not c.two_stage


@pytest.mark.parametrize("spec,params", [("8bit", {}), ("qsgd", {}), ("qsgd", {"bucket_size": 96}),
                                         ("qsgd", {"levels": 1000}), ("natural", {}),
                                         ("onebit", {})])
@pytest.mark.parametrize("n,size", [(1, 4), (1001, 3), (4096, 8), (300, 1)])
def test_expected_rounds_are_the_bytes_both_rounds_put_on_the_wire(spec, params, n, size):
    c = C.create(spec, exchange="two_stage", **params)
    c.bind(0, size)
    payload, ctx = c.compress(torch.randn(n), "w")
    (first, kind1), (second, kind2) = c.expected_rounds(torch.Size([n]))
    assert (kind1, kind2) == (C.Exchange.ALLTOALL, C.Exchange.ALLGATHER)
    assert first == pack_rows(payload, size).numel()
    reduced = tuple(t[:1].expand(size, *t.shape[1:]) for t in payload)  # as if all sent ours
    owner = c.next_round(reduced, ctx)
    assert second == pack(list(owner), header=False).numel()
    assert c.expected_bytes(torch.Size([n])) == (first + second, C.Exchange.ALLTOALL)


@pytest.mark.parametrize("spec,bits", [("8bit", 8), ("onebit", 1), ("qsgd", 8), ("natural", 8)])
@pytest.mark.parametrize("size", [2, 4, 8, 32])
def test_link_bytes_stay_near_two_payloads_whatever_the_world_size(spec, bits, size):
    """≈ 2·(N−1)/N·n·b/8 for two stages against (N−1)·n·b/8 for the allgather."""
    n = 1 << 20
    c = C.create(spec, exchange="two_stage")
    c.bind(0, size)
    two = sum(link_bytes(k, b, size) for b, k in c.expected_rounds(torch.Size([n])))
    ideal = 2 * (size - 1) / size * n * bits / 8
    assert ideal <= two <= ideal * 1.01 + 64 * size
    gather = C.create(spec, exchange="allgather")
    gather.bind(0, size)
    (nbytes, kind), = gather.expected_rounds(torch.Size([n]))
    assert link_bytes(kind, nbytes, size) == pytest.approx((size - 1) * n * bits / 8, rel=0.01)


def test_alltoall_link_bytes_are_every_row_but_ones_own():
    assert link_bytes(C.Exchange.ALLTOALL, 400, 4) == 300
    rows = [torch.arange(12, dtype=torch.int16).view(4, 3), torch.ones(4, 1)]
    buffer = pack_rows(rows, 4)
    assert buffer.shape == (4, align(6) + align(4))
    back = unpack_rows(buffer, [torch.int16, torch.float32], [3, 1])
    assert torch.equal(back[0], rows[0]) and torch.equal(back[1], rows[1])


@pytest.mark.parametrize("spec", TWO_STAGE)
def test_owner_residuals_are_state_and_belong_to_one_rank_of_one_world(spec):
    size, n = 3, 500
    compressors = ranks(spec, size)
    gen = torch.Generator().manual_seed(0)
    exchange(compressors, [torch.randn(n, generator=gen) for _ in range(size)])
    state = compressors[1].state_dict()
    assert state["owner"]["rank"] == 1 and state["owner"]["size"] == size
    saved = state["owner"]["residuals"]["w"]
    assert saved.shape == (C.chunk_width(n, size, compressors[1].chunk_multiple),)
    fresh = C.create(spec, exchange="two_stage")
    fresh.load_state_dict(state)
    fresh.bind(1, size)  # the same rank of the same world: kept
    assert torch.equal(fresh.owner_residuals["w"], saved)
    fresh.rescale(0.5)
    assert torch.equal(fresh.owner_residuals["w"], saved * 0.5)
    assert torch.equal(state["owner"]["residuals"]["w"], saved)  # a copy
    fresh.bind(2, size)  # another chunk
    assert fresh.owner_residuals == {}
    fresh.load_state_dict(state)
    fresh.bind(1, size + 1)  # chunks of another width
    assert fresh.owner_residuals == {}
    assert C.create(spec).state_dict()["owner"]["residuals"] == {}

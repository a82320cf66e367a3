"""The single-process checks whose outcome depends on the device, on the device under test
(``HOROVOD_GRAVAC_TEST_DEVICE``; see ``tests/gpu/device.py``): compressors, error-feedback
memories, the two-stage exchange's pieces, the gain and error probes, the layer plan's
errors. Where a result does not depend on random draws it must equal the host's (the CPU
path, with its data-dependent shortcuts)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from horovod_gravac import agents as A
from horovod_gravac import compression as C
from horovod_gravac.compression import base
from horovod_gravac.compression.twostage import valid_counts
from horovod_gravac.probing import ErrorProbe, GainProbe
from horovod_gravac.transport import pack, pack_rows, unpack, unpack_rows
from tests.test_twostage import TWO_STAGE, exchange, owner_residual, ranks

ALL = C.names()
#: compressors whose result depends on no random draw: the device must decode what the host does
DRAWLESS = ["none", "fp16", "8bit", "topk", "topk:value_dtype=float16", "onebit", "signsgd",
            "signum", "efsignsgd"]
SEEDED = ["randomk", "dgc", "qsgd", "terngrad", "natural", "powersgd"]


def exchange_locally(compressor, tensors, name="w", step=0):
    """What the engine does for N simulated ranks (tests.test_compression's helper, which
    needs hypothesis): every round but the last summed, then the sum of the last."""
    compressed = [compressor.compress(t, name, step) for t in tensors]
    ctxs, payloads = [c for _, c in compressed], [p for p, _ in compressed]
    for _ in range(ctxs[0].rounds - 1):
        reduced = tuple(torch.stack(parts).sum(0) for parts in zip(*payloads))
        payloads = [compressor.next_round(reduced, c) for c in ctxs]
    return compressor.aggregate(payloads, ctxs[0])


def roundtrip(compressor, tensor, name="w", step=0):
    return exchange_locally(compressor, [tensor], name, step)


@contextlib.contextmanager
def on_the_host_path():
    """The CPU's own paths (data-dependent sizes), whatever the device fixture set."""
    saved = base.HOST_DEVICES
    base.HOST_DEVICES = frozenset({"cpu"})
    try:
        yield
    finally:
        base.HOST_DEVICES = saved


def gaussian(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- compressors -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0,), (7,), (33, 17), (8, 3, 3, 3)])
def test_round_trip_keeps_shape_dtype_and_device(device, name, dtype, shape):
    t = gaussian(*shape).to(device, dtype)
    out = roundtrip(C.create(name), t)
    assert (out.shape, out.dtype, out.device) == (t.shape, dtype, t.device)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec", DRAWLESS)
def test_the_device_decodes_what_the_host_decodes(device, spec):
    t = gaussian(300, 40, seed=1)
    with on_the_host_path():
        expected = roundtrip(C.create(spec), t)
    got = roundtrip(C.create(spec), t.to(device)).cpu()
    if spec == "8bit":  # x·127/max may round the other way at a half: one code
        torch.testing.assert_close(got, expected, rtol=0, atol=float(t.abs().max()) / 127 * 1.001)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["8bit", "onebit"])
def test_two_stage_decodes_what_the_host_decodes(device, spec):
    grads = [gaussian(1001, seed=i) for i in range(3)]
    with on_the_host_path():
        expected = exchange(ranks(spec, 3), grads)[0]
    got = exchange(ranks(spec, 3), [g.to(device) for g in grads])[0].cpu()
    atol = 3 * sum(float(g.abs().max()) for g in grads) / 127 if spec == "8bit" else 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", ALL)
def test_error_feedback_keeps_what_was_not_sent_on_the_device(device, name):
    """compensated = decompress(payload) + the new residual, which stays on the device."""
    c = C.create(name)
    memory = C.create_memory("residual", c)
    for step in range(3):
        compensated = memory.compensate(gaussian(50, 20, seed=step).to(device), "w")
        before = compensated.clone()
        payload, ctx = c.compress(compensated, "w", step)
        if ctx.rounds == 2:  # PowerSGD: the residual is taken once Q exists
            payload = c.next_round(payload, ctx)
            sent = ctx.extra["p"] @ ctx.extra["q_local"].t()
        else:
            sent = c.decompress(payload, ctx)
        memory.update("w", compensated, c, payload, ctx)
        assert memory.residuals["w"].device == device
        torch.testing.assert_close(sent.reshape(before.shape) + memory.residuals["w"], before)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_stays_visible_on_the_device(device, name, bad):
    t = gaussian(64, 40).to(device)
    t[5, 7] = bad
    assert not torch.isfinite(roundtrip(C.create(name), t)).all()


@pytest.mark.parametrize("spec", TWO_STAGE)
def test_a_non_finite_chunk_reaches_every_rank_and_no_owner_residual(device, spec):
    grads = [gaussian(1001, seed=i).to(device) for i in range(3)]
    grads[1][500] = float("nan")
    compressors = ranks(spec, 3)
    for result in exchange(compressors, grads):
        assert not torch.isfinite(result).all()
    for c in compressors:
        assert all(torch.isfinite(r).all() and r.device == device
                   for r in c.owner_residuals.values())


@pytest.mark.parametrize("spec", SEEDED)
def test_seeded_draws_repeat_at_a_step_and_change_with_it(device, spec):
    t = gaussian(300, 40, seed=2).to(device)
    first = roundtrip(C.create(spec), t, step=7)
    torch.testing.assert_close(roundtrip(C.create(spec), t, step=7), first, rtol=0, atol=0)
    if spec in ("randomk", "qsgd", "terngrad", "natural"):
        assert not torch.equal(roundtrip(C.create(spec), t, step=8), first)


@pytest.mark.parametrize("name", ["qsgd", "terngrad", "natural"])
def test_stochastic_rounding_is_keyed_by_the_rank_on_the_device(device, name):
    x = gaussian(4096).to(device)
    rank0, rank1 = C.create(name), C.create(name)
    rank1.process_rank = 1  # what the engine sets from its transport
    assert not torch.equal(roundtrip(rank0, x, step=3), roundtrip(rank1, x, step=3))


def test_randomk_positions_are_the_same_on_every_rank_on_the_device(device):
    x = gaussian(4096).to(device)
    rank0, rank1 = C.create("randomk:16"), C.create("randomk:16")
    rank1.process_rank = 1
    _, ctx0 = rank0.compress(x, "w", 3)
    _, ctx1 = rank1.compress(x, "w", 3)
    assert torch.equal(ctx0.extra["indices"], ctx1.extra["indices"])
    assert ctx0.extra["indices"].unique().numel() == 4096 // 16


@pytest.mark.parametrize("name,params", [("qsgd", {"levels": 4}), ("natural", {}),
                                         ("randomk", {"cf": 4, "unbiased": True}),
                                         ("terngrad", {"clip": 100.0})])
def test_stochastic_compressors_stay_unbiased_on_the_device(device, name, params):
    t = gaussian(64, seed=3).to(device)
    c = C.create(name, **params)
    draws = torch.stack([roundtrip(c, t, step=s).double() for s in range(500)])
    # within 5 standard errors everywhere; a bias of 1% of |t| would show on the mean
    bound = 5 * draws.std(0) / 500 ** 0.5 + 1e-6
    assert ((draws.mean(0) - t.double()).abs() <= bound).all()


def test_topk_sends_exactly_the_k_largest_on_the_device(device):
    t = gaussian(200_000, seed=4)
    c = C.create("topk:100")
    payload, ctx = c.compress(t.to(device))
    assert payload[0].numel() == 2000 and payload[0].device == device
    assert set(c.indices(payload, ctx).tolist()) == set(torch.topk(t.abs(), 2000).indices.tolist())


@pytest.mark.parametrize("cf", [10, 100])
def test_dgc_sends_k_of_its_candidates_on_the_device(device, cf):
    t = gaussian(1_000_000, seed=5).to(device)
    payload, _ = C.create("dgc", cf=cf).compress(t, "w", 3)
    assert payload[0].numel() == 1_000_000 // cf  # the accelerator path: exactly k slots
    assert (payload[0] != 0).sum() >= 0.7 * 1_000_000 // cf


def test_every_rank_decodes_the_same_sum_of_overlapping_payloads(device):
    """Every rank decodes the same gathered payloads: their sum must not depend on the order
    in which the device happens to add overlapping positions, or the ranks' models drift
    apart. 4 ranks' TopK at CF 40 (index payloads, one index_add_) of correlated gradients:
    most positions are sent by every rank."""
    c = C.create("topk:40")
    base_grad = gaussian(1 << 20)
    payloads = [c.compress((base_grad + 0.1 * gaussian(1 << 20, seed=10 + r)).to(device))[0]
                for r in range(4)]
    ctx = c.compress(base_grad.to(device))[1]
    assert not c._is_bitmap(payloads[0])
    first = c.aggregate(payloads, ctx)
    for _ in range(10):
        assert torch.equal(c.aggregate(payloads, ctx), first)
    one_by_one = sum(c.decompress(p, ctx).double() for p in payloads)
    torch.testing.assert_close(first.double(), one_by_one, rtol=1e-6, atol=1e-6)


# -- error-feedback memories -------------------------------------------------------------------
@pytest.mark.parametrize("memory,spec", [("residual", "topk:10"), ("dgc", "topk:10"),
                                         ("efsignsgd", "efsignsgd")])
def test_memories_keep_their_state_on_the_device(device, memory, spec):
    c = C.create(spec)
    mem = C.create_memory(memory, c)
    for step in range(2):
        g = mem.compensate(gaussian(40, 30, seed=step).to(device), "w")
        payload, ctx = c.compress(g, "w", step)
        mem.update("w", g, c, payload, ctx)
    state = mem.state_dict()
    tensors = [v for part in state.values() if isinstance(part, dict) for v in part.values()
               if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device == device for t in tensors)
    again = C.create_memory(memory, c)
    again.load_state_dict(state)
    g = gaussian(40, 30, seed=9).to(device)
    torch.testing.assert_close(again.compensate(g.clone(), "w"), mem.compensate(g.clone(), "w"))


def test_dgc_memory_masks_what_was_sent_on_the_device(device):
    c = C.create("topk", cf=10)
    mem = C.create_memory("dgc", c, momentum=0.5)
    g = torch.arange(1.0, 21.0, device=device)
    v = mem.compensate(g, "w")
    payload, ctx = c.compress(v)
    mem.update("w", v, c, payload, ctx)
    assert set(c.indices(payload, ctx).tolist()) == {18, 19}
    assert not mem.velocities["w"][18:].any() and not mem.accumulated["w"][18:].any()
    torch.testing.assert_close(mem.velocities["w"][:18], g[:18])


# -- the two-stage exchange's pieces -----------------------------------------------------------
@pytest.mark.parametrize("spec", TWO_STAGE)
def test_both_stages_feed_back_what_they_dropped_on_the_device(device, spec):
    """Σ results + every residual + the owners' residuals = Σ gradients, on the device."""
    size, n = 3, 333
    compressors = ranks(spec, size)
    memories = [C.ResidualMemory() for _ in range(size)]
    sent = torch.zeros(n, dtype=torch.float64, device=device)
    total = torch.zeros(n, dtype=torch.float64, device=device)
    for step in range(6):
        grads = [gaussian(n, seed=10 * step + r).to(device) for r in range(size)]
        total += torch.stack(grads).double().sum(0)
        results = exchange(compressors, grads, memories, step=step)
        assert all(torch.equal(r, results[0]) for r in results)
        sent += results[0].double()
    kept = sum(m.residuals["w"].double() for m in memories)
    kept = kept + owner_residual(compressors, "w", n).double()
    assert kept.device == device
    torch.testing.assert_close(sent + kept, total, rtol=0, atol=1e-4)


def test_transport_buffers_round_trip_on_the_device(device):
    tensors = [torch.arange(12, dtype=torch.int16, device=device).view(4, 3),
               torch.ones(4, 1, device=device), torch.zeros(4, 5, dtype=torch.uint8, device=device)]
    rows = pack_rows(tensors, 4)
    back = unpack_rows(rows, [t.dtype for t in tensors], [t.shape[1] for t in tensors])
    assert rows.device == device and all(torch.equal(a, b) for a, b in zip(back, tensors))
    flat = [t.reshape(-1) for t in tensors]
    for header in (False, True):
        buffer = pack(flat, header=header)
        assert buffer.device == device
        got, _ = unpack(buffer, [t.dtype for t in flat], None if header else
                        [t.numel() for t in flat])
        assert all(torch.equal(a, b) for a, b in zip(got, flat))
    counts = valid_counts(4, 1, 10, 3, device)
    assert counts.device == device and counts.tolist() == [3, 3, 1, 0]


# -- probes and the layer plan's errors --------------------------------------------------------
@pytest.mark.parametrize("spec,sample", [("topk:10", None), ("topk:10", 2048),
                                         ("randomk:10", None), ("dgc:10", None),
                                         ("powersgd", None)])
def test_energy_profiles_match_the_host_and_copy_nothing_from_it(device, spec, sample,
                                                                 monkeypatch):
    """The gain probe runs in the backward hooks: on the device it must give the host's
    energies and build them without torch.tensor (a host-to-device copy waits for the
    device's queue)."""
    x = gaussian(256, 128, seed=6)
    warm_q = torch.linalg.qr(gaussian(128, 8, seed=11)).Q  # PowerSGD's, CF 10 being rank 8

    def made(where):  # the same warm start on both (a fresh Q is drawn on the device)
        compressor = C.create(spec)
        if spec == "powersgd":
            compressor.qs["w"] = warm_q.to(where)
        return compressor

    with on_the_host_path():
        expected = made("cpu").energy_profile(x, [10, 20, 40], "w", 0, sample=sample)
    compressor = made(device)

    def host_copy(*args, **kwargs):
        raise AssertionError("torch.tensor called in energy_profile")

    monkeypatch.setattr(torch, "tensor", host_copy)
    got = compressor.energy_profile(x.to(device), [10, 20, 40], "w", 0, sample=sample)
    assert got.device == device
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-3)


def test_gain_and_error_probes_measure_on_the_device(device):
    compressor = C.create("topk")
    sizes = [("a", 256 * 128), ("b", 4096)]
    grads = {"a": gaussian(256, 128, seed=7), "b": gaussian(4096, seed=8)}
    gains = GainProbe(A.ProbeSpec(A.GainMeasure(A.COMPENSATED, A.GRADIENT, 2)),
                      compressor, sizes)
    errors = ErrorProbe(A.ErrorSpec(factors=(0.5, 1.0, 2.0)), compressor, sizes)
    decision = A.Decision(cf=20.0, theta_min=10.0, measure_errors=True)
    rows = {}
    for where in ("cpu", device):
        for name, g in grads.items():
            g = g.to(where)
            gains.measure(name, g, g, decision, 0)
            errors.measure(name, g, decision, 0)
        rows[where] = gains.take(where), errors.take(where)
    for ours, host in zip(rows[device], rows["cpu"]):
        assert ours.device == device
        torch.testing.assert_close(ours.cpu(), host, rtol=1e-4, atol=1e-3)


def test_projection_errors_are_the_exact_compression_errors_on_the_device(device):
    g = gaussian(300, 200, seed=9).to(device)
    cfs = (5.0, 20.0, 80.0)
    topk = C.create("topk")
    exact = torch.stack([torch.linalg.vector_norm(g - topk.decompress(*topk.compress(g, cf=cf))
                                                  ).square() for cf in cfs])
    torch.testing.assert_close(topk.error_profile(g, cfs), exact, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(topk.error_profile(g, cfs, sample=16384), exact, rtol=0.05, atol=0)
    psgd = C.create("powersgd")
    psgd.qs["w"] = torch.linalg.qr(gaussian(200, 24, seed=10)).Q.to(device)  # CF 5: rank 24
    errors = psgd.error_profile(g, cfs, "w")
    assert errors.device == device and (errors[1:] >= errors[:-1] - 1e-3).all()
    payload, _ = psgd.compress(g, "w", cf=cfs[0])
    p_hat = torch.linalg.qr(payload[0]).Q
    torch.testing.assert_close(errors[0], torch.linalg.vector_norm(
        g - p_hat @ (p_hat.t() @ g)).square(), rtol=1e-4, atol=1e-2)


# -- the engine's device-side helpers -----------------------------------------------------------
def test_finite_checks_read_nothing_back_and_stay_on_the_device(device):
    good, bad = gaussian(100).to(device), gaussian(100).to(device)
    bad[3] = float("inf")
    assert C.is_finite(good).device == device
    assert bool(C.is_finite(good)) and not bool(C.is_finite(bad))
    assert not bool(C.payload_is_finite((good, bad)))
    assert C.finite_marker(bad).isnan().all() and C.finite_marker(good).eq(0).all()
    tensors = [good.clone(), good.clone()]
    assert bool(C.scale_and_check(tensors, 0.5))
    torch.testing.assert_close(tensors[0], good * 0.5)
    assert not bool(C.scale_and_check([bad.clone()], 0.5))

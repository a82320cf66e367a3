"""The Adam-family exchange in one process: its update against a reference of 1-bit Adam's,
the lossless exchange through the optimizer against Adam then frozen-variance momentum SGD,
the floor, the gain an agent measures, the phases' decisions, state and bad settings."""
import math

import horovod.torch as hvd
import pytest
import torch

import horovod_gravac as hg
from horovod_gravac import adam
from horovod_gravac import agents as A
from horovod_gravac.adam import AdamExchange

LR, BETAS, EPS, WD = 0.01, (0.9, 0.99), 1e-3, 0.1


@pytest.fixture(scope="module")
def single_rank():
    hvd.init()


def noisy_gradients(shapes, ranks, steps, seed=0):
    """grads[step][rank][i]: per step and coordinate a common gradient of random sign and a
    magnitude in [1, 1.5], plus a little noise per rank (the momentum then stays below the
    frozen √v̂, so the floor does not bind)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        common = [(torch.randint(0, 2, s, generator=gen) * 2.0 - 1.0)
                  * (1 + 0.5 * torch.rand(s, generator=gen)) for s in shapes]
        out.append([[c + 0.1 * torch.randn(c.shape, generator=gen) for c in common]
                    for _ in range(ranks)])
    return out


def one_bit_adam_reference(params, grads, warmup, decoupled):
    """DeepSpeed's 1-bit Adam (runtime/fp16/onebit/adam.py) with an exact compressed allreduce,
    written out: Adam on the averaged gradient for ``warmup`` steps, then v frozen and the
    ranks' momenta m_i = β1·m + (1 − β1)·g_i averaged; the update m / (√v + ε) — here with
    torch Adam's bias corrections (v̂ = v_T / (1 − β2^T), m̂ = m / (1 − β1^t)), which the
    library keeps."""
    b1, b2 = BETAS
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, per_rank in enumerate(grads, start=1):
        for i, p in enumerate(params):
            local = [g[i] + (0 if decoupled else WD * p) for g in per_rank]
            if t <= warmup:
                g = torch.stack(local).mean(0)
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                denominator = (v[i] / (1 - b2 ** t)).sqrt() + EPS
            else:
                m[i] = torch.stack([b1 * m[i] + (1 - b1) * g for g in local]).mean(0)
                denominator = (v[i] / (1 - b2 ** warmup)).sqrt() + EPS
            if decoupled:
                p.mul_(1 - LR * WD)
            p.sub_(LR / (1 - b1 ** t) * m[i] / denominator)
    return params, m, v


@pytest.mark.parametrize("sends", adam.SENDS)
@pytest.mark.parametrize("family", ["AdamW", "Adam"])
def test_the_frozen_variance_update_equals_a_one_bit_adam_reference(family, sends):
    """Exchanged exactly, a rank's momentum or its gradient (the momentum then taken after
    the average) is the same update: the average is linear."""
    shapes, ranks, steps, warmup = [(6, 5), (5,)], 3, 9, 4
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads = noisy_gradients(shapes, ranks, steps)
    optimizer = getattr(torch.optim, family)(params, lr=LR, betas=BETAS, eps=EPS,
                                             weight_decay=WD)
    exchange = AdamExchange(warmup=warmup, max_warmup=warmup, sends=sends)
    exchange.bind(optimizer)
    for step, per_rank in enumerate(grads):
        if step == warmup:
            exchange.freeze()
        if exchange.frozen:  # every rank's x_i, averaged exactly: what a lossless exchange does
            for i, p in enumerate(params):
                p.grad = torch.stack([exchange.exchanged(p, g[i]) for g in per_rank]).mean(0)
        else:
            for i, p in enumerate(params):
                p.grad = torch.stack([g[i] for g in per_rank]).mean(0)
        exchange.step()
    expected, m, v = one_bit_adam_reference(start, grads, warmup, family == "AdamW")
    assert exchange.frozen_step == warmup
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), expected[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], m[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], v[i])  # frozen at T
        assert int(optimizer.state[p]["step"]) == steps
        # the floor never bound on these gradients: the denominators are the frozen ones
        frozen = (v[i] / (1 - BETAS[1] ** warmup)).sqrt() + EPS
        torch.testing.assert_close(exchange._denominators[p], frozen)


def test_the_floor_bounds_updates_where_gradients_outgrow_the_frozen_variance():
    p = torch.zeros(200, requires_grad=True)
    optimizer = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=1e-8, weight_decay=0.0)
    exchange = AdamExchange(warmup=1)
    exchange.bind(optimizer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # v from gradients of scale 1e-3
        p.grad = 1e-3 * torch.randn(200, generator=gen)
        exchange.step()
    exchange.freeze()
    for _ in range(10):  # then gradients a million times larger, always positive
        before = p.detach().clone()
        p.grad = exchange.exchanged(p, 1e3 * (1 + torch.rand(200, generator=gen)))
        exchange.step()
        moved = (before - p.detach()).abs().max().item()
        # at most lr / (1 − β1^t): the most a coordinate moves under dense Adam's steady state
        assert moved <= LR / (1 - BETAS[0] ** exchange.steps) * (1 + 1e-6), moved
    assert (exchange._denominators[p] > 100).all()  # the floor rose with the momentum


def adam_through_the_optimizer(compression, steps, warmup, gradients, agent=None, **kw):
    """A DistributedOptimizer over w (30×20) and b (20) on one rank; returns the model's
    parameters after each step and the optimizer."""
    torch.manual_seed(0)
    w = torch.randn(30, 20, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    base = torch.optim.AdamW([w, b], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    opt = hg.DistributedOptimizer(base, named_parameters=[("w", w), ("b", b)],
                                  compression=compression, min_compress_numel=0, agent=agent,
                                  adam_exchange=AdamExchange(warmup=warmup, max_warmup=warmup),
                                  **kw)
    trajectory = []
    for step in range(steps):
        opt.zero_grad()
        gw, gb = gradients[step][0]
        ((w * gw).sum() + (b * gb).sum()).backward()  # exactly these gradients
        opt.step()
        trajectory.append((w.detach().clone(), b.detach().clone()))
    return trajectory, opt


def test_a_lossless_exchange_is_adam_until_the_freeze_then_frozen_momentum_sgd(single_rank):
    steps, warmup = 10, 4
    grads = noisy_gradients([(30, 20), (20,)], 1, steps, seed=3)
    ours, opt = adam_through_the_optimizer("none", steps, warmup, grads)
    torch.manual_seed(0)
    w, b = torch.randn(30, 20), torch.randn(20)
    dense = torch.optim.AdamW([w, b], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    frozen = None
    for step in range(steps):
        if step < warmup:  # Adam itself, bit for bit
            w.grad, b.grad = grads[step][0]
            dense.step()
        else:  # momentum SGD with Adam's preconditioner frozen at step T = warmup
            if frozen is None:
                frozen = {id(p): (dense.state[p]["exp_avg_sq"] / (1 - BETAS[1] ** warmup)).sqrt()
                          + EPS for p in (w, b)}
            for p, g in zip((w, b), grads[step][0]):
                m = dense.state[p]["exp_avg"].lerp_(g, 1 - BETAS[0])
                p.mul_(1 - LR * WD).sub_(LR / (1 - BETAS[0] ** (step + 1)) * m / frozen[id(p)])
        got_w, got_b = ours[step]
        if step < warmup:
            assert torch.equal(got_w, w) and torch.equal(got_b, b), step
        else:
            torch.testing.assert_close(got_w, w, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_b, b, rtol=1e-5, atol=1e-6)
    assert [d.send for d in opt.decisions] == ["dense"] * warmup + ["compressed"] * (steps - warmup)
    assert [d.variance_frozen for d in opt.decisions] == [False] * warmup + [True] * (steps - warmup)


@pytest.mark.parametrize("sends", adam.SENDS)
def test_gravac_measures_its_gain_on_what_is_exchanged_exactly(single_rank, sends):
    """One warm-up step with g0, then x = d ⊙ g1 (or, sending the momentum,
    d ⊙ (β1·m + (1 − β1)·g1)) is exchanged: the gain terms GraVAC sees are ‖x‖² and
    ‖TopK(x, c)‖² for every ladder CF — not the raw gradient's."""
    class Recording(A.GraVAC):
        def decide(self, stats):
            self.seen = stats
            return super().decide(stats)

    g0 = torch.tensor([1.0, -1.0, 2.0, 1.0, -2.0, 1.0, 1.0, -1.0, 1.0, 0.001])
    g1 = torch.tensor([3.0, -3.0, 2.0, -2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.01])
    w = torch.zeros(10, requires_grad=True)
    agent = Recording(theta_min=2, theta_max=10, window=100, settle_steps=0, gain_sample=None,
                      search="cost_model")
    base = torch.optim.AdamW([w], lr=LR, betas=BETAS, eps=1e-8, weight_decay=0.0)
    opt = hg.DistributedOptimizer(base, named_parameters=[("w", w)], compression="topk",
                                  agent=agent, min_compress_numel=0,
                                  adam_exchange=AdamExchange(warmup=1, max_warmup=1,
                                                             sends=sends))
    for g in (g0, g1):
        opt.zero_grad()
        (w * g).sum().backward()
        opt.step()
    m = (1 - BETAS[0]) * g0  # after the dense step; v̂ = g0² at T = 1
    sent = g1 if sends == adam.GRADIENT else BETAS[0] * m + (1 - BETAS[0]) * g1
    x = sent / (g0.abs() + 1e-8)
    energies = x.pow(2).sort(descending=True).values
    expected = {cf: energies[:max(1, int(10 // cf))].sum().item() for cf in (2, 4, 8, 10)}
    seen = agent.seen
    assert seen.gain_measured and seen.step == 1
    assert seen.gain_reference == pytest.approx(x.pow(2).sum().item(), rel=1e-6)
    assert seen.gain_ladder == pytest.approx(expected, rel=1e-6)
    # the coordinate whose v is tiny dominates the update — and the gain — not the gradient
    assert x.abs().argmax().item() == 9 and g1.abs().argmax().item() != 9


def test_the_phases_are_dense_until_the_rule_freezes_then_the_agents_own():
    rule = A.FreezeRule(warmup=3, tolerance=0.1, check_interval=2, max_warmup=8)
    phases = A.AdamPhases(A.Static(cf=50), rule)
    assert phases.initial_decision() == A.Decision(cf=None, send="dense", measure_gain=False)
    assert phases.sets_cf and phases.name == "static" and phases.probe is None

    def stats(step, change=None):
        return A.StepStats(step=step, iter_time=0.1, world_size=2, variance_change=change)

    # a small change before the warm-up's end does not freeze; a large one after it neither
    assert not phases.decide(stats(0, 0.01)).variance_frozen
    assert not phases.decide(stats(3, 0.5)).variance_frozen
    frozen = phases.decide(stats(4, 0.05))  # 5 steps done, r ≤ 0.1
    assert frozen == A.Decision(cf=50, variance_frozen=True) and phases.frozen_at == 5
    assert phases.decide(stats(5)) == A.Decision(cf=50, variance_frozen=True)
    assert [r["phase"] for r in phases.history] == ["warmup"] * 3 + ["frozen"]
    # without a measurement below the tolerance, max_warmup freezes; without an agent, the
    # compressor's own setting (cf None) is sent
    late = A.AdamPhases(None, rule)
    assert not late.sets_cf
    assert not late.decide(stats(6, 0.5)).variance_frozen
    assert late.decide(stats(7)) == A.Decision(cf=None, variance_frozen=True)
    # its state survives a round trip (the rule is a setting, not state)
    again = A.AdamPhases(A.Static(cf=50), rule)
    again.load_state_dict(phases.state_dict())
    assert again.frozen_at == 5 and again.initial_decision() == phases.initial_decision()


def test_a_decision_with_the_compressors_own_cf_and_a_frozen_variance_round_trips():
    layers = ["a", "b"]
    for decision in (A.Decision(cf=None, variance_frozen=True),
                     A.Decision(cf=20.0, theta_min=10.0, send="min", layer_cf={"b": 40.0},
                                variance_frozen=True),
                     A.Decision(cf=None, send="dense", measure_gain=False)):
        encoded = decision.encode(layers)
        assert len(encoded) == A.Decision.encoded_length(layers)
        assert A.Decision.decode(encoded, layers) == decision


def test_the_variance_change_is_the_relative_l1_change_of_the_preconditioner():
    p = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.Adam([p], lr=LR, betas=(0.9, 0.5), eps=EPS)
    exchange = AdamExchange(warmup=1, check_interval=2)
    exchange.bind(optimizer)
    roots = []
    for g in ([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0],
              [1.0, 3.0, 1.0, 3.0]):
        p.grad = torch.tensor(g)
        exchange.step()
        t = exchange.steps
        roots.append((optimizer.state[p]["exp_avg_sq"] / (1 - 0.5 ** t)).sqrt())
    # measured at steps 2 and 4: the second measurement compares them
    expected = (roots[3] - roots[1]).abs().sum() / roots[3].sum()
    assert exchange.take_variance_change() == pytest.approx(expected.item(), rel=1e-6)
    assert exchange.take_variance_change() is None  # handed on once


def test_state_dict_round_trip_goes_on_bit_for_bit():
    def run(split=None):
        torch.manual_seed(0)
        p = torch.randn(8, 3, requires_grad=True)
        optimizer = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        exchange = AdamExchange(warmup=2, check_interval=1, tolerance=10.0)
        exchange.bind(optimizer)
        grads = noisy_gradients([(8, 3)], 1, 12, seed=5)
        for step, per_rank in enumerate(grads):
            if step == split:
                saved = {"opt": optimizer.state_dict(), "ex": exchange.state_dict(),
                         "p": p.detach().clone()}
                with torch.no_grad():
                    p.copy_(saved["p"])
                optimizer = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS,
                                              weight_decay=WD)
                optimizer.load_state_dict(saved["opt"])
                exchange = AdamExchange(warmup=2, check_interval=1, tolerance=10.0)
                exchange.bind(optimizer)
                exchange.load_state_dict(saved["ex"])
            if step == 3 and not exchange.frozen:
                exchange.freeze()
            g = per_rank[0][0] * (1 + 10 * step)  # growing: the floor binds and is kept
            p.grad = exchange.exchanged(p, g) if exchange.frozen else g
            exchange.step()
        return p.detach(), optimizer.state_dict()["state"][0]

    whole = run()
    for split in (2, 7):  # before and after the freeze
        resumed = run(split)
        assert torch.equal(whole[0], resumed[0]), split
        for key, value in whole[1].items():
            assert torch.equal(value, resumed[1][key]), (split, key)


def test_auto_runs_the_exchange_for_adam_family_optimizers_under_real_compression():
    p = torch.zeros(3, requires_grad=True)
    adamw, sgd = torch.optim.AdamW([p]), torch.optim.SGD([p], lr=0.1)
    topk, fp16, none = (hg.compression.create(n) for n in ("topk", "fp16", "none"))
    assert isinstance(adam.create("auto", adamw, topk), AdamExchange)
    assert isinstance(adam.create("auto", torch.optim.Adam([p]), topk), AdamExchange)
    assert adam.create("auto", adamw, fp16) is None and adam.create("auto", adamw, none) is None
    assert adam.create("auto", sgd, topk) is None
    assert adam.create("off", adamw, topk) is None and adam.create(None, adamw, topk) is None
    given = AdamExchange(warmup=7)
    assert adam.create(given, adamw, none) is given and given.optimizer is adamw


@pytest.mark.parametrize("make,message", [
    (lambda p: adam.create(AdamExchange(), torch.optim.SGD([p], lr=0.1), None),
     "needs a torch.optim.Adam or torch.optim.AdamW, got SGD"),
    (lambda p: adam.create("on", torch.optim.AdamW([p]), None),
     "adam_exchange must be 'auto', 'off' or an AdamExchange, got 'on'"),
    (lambda p: AdamExchange(warmup=0), "warmup must be an integer >= 1, got 0"),
    (lambda p: AdamExchange(warmup=0.5), "warmup must be an integer >= 1, got 0.5"),
    (lambda p: AdamExchange(tolerance=0), "tolerance must be a number > 0, got 0"),
    (lambda p: AdamExchange(check_interval=0), "check_interval must be an integer >= 1"),
    (lambda p: AdamExchange(sends="update"), r"sends must be one of \('momentum', "
                                             r"'gradient'\), got 'update'"),
    (lambda p: AdamExchange(warmup=10, max_warmup=5), "max_warmup must be None or an integer "
                                                      ">= 10, got 5"),
    (lambda p: AdamExchange().bind(torch.optim.AdamW([p], amsgrad=True)), "amsgrad=True"),
    (lambda p: AdamExchange().bind(_with_betas(torch.optim.AdamW([p]), (0.9, 1.0))),
     r"param_groups\[0\]: betas\[1\] must be in \[0, 1\), got 1.0"),
    (lambda p: AdamExchange().bind(_with_betas(torch.optim.Adam([p]), (-0.1, 0.99))),
     r"betas\[0\] must be in \[0, 1\), got -0.1"),
    (lambda p: adam.create_memory("dgc", hg.compression.create("topk"), AdamExchange()),
     "memory='dgc' keeps a momentum of its own"),
])
def test_bad_settings_raise_before_training_naming_the_value(make, message):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        make(p)


def _with_betas(optimizer, betas):
    optimizer.param_groups[0]["betas"] = betas  # torch checks them only at construction
    return optimizer


def test_the_optimizers_refuse_what_the_exchange_cannot_run(single_rank):
    model = torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match="needs a torch.optim.Adam or torch.optim.AdamW"):
        hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                named_parameters=model.named_parameters(),
                                compression="topk", adam_exchange=AdamExchange())
    with pytest.raises(ValueError, match="needs op=hvd.Average"):
        hg.DistributedOptimizer(torch.optim.AdamW(model.parameters()),
                                named_parameters=model.named_parameters(),
                                compression="topk", op=hvd.Sum)
    with pytest.raises(ValueError, match="adam_exchange must be 'auto', 'off' or an AdamExchange"):
        hg.DistributedOptimizer(torch.optim.AdamW(model.parameters()),
                                named_parameters=model.named_parameters(),
                                compression="topk", adam_exchange=True)
    # SGD under "auto" keeps exchanging gradients; AdamW gets the exchange and its agent
    sgd = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(), compression="topk")
    adamw = hg.DistributedOptimizer(torch.optim.AdamW(model.parameters()),
                                    named_parameters=model.named_parameters(),
                                    compression="topk", agent="gravac")
    assert sgd.adam is None and isinstance(adamw.adam, AdamExchange)
    assert isinstance(adamw.agent, A.AdamPhases) and isinstance(adamw.agent.agent, A.GraVAC)
    assert adamw.memory.name == "residual"
    assert not math.isnan(adamw.adam.rule.tolerance)

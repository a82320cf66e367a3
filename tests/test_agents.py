"""Agent decision logic with scripted statistics (no processes, no tensors)."""
import pytest

from horovod_gravac import agents as A
from horovod_gravac.agents import RECENT_STEPS, Decision, StepStats


def stats(step, d_min=1.0, d_c=0.9, iter_time=1.0, sent="compressed", world=1, reference=1.0,
          **kw):
    return StepStats(step=step, iter_time=iter_time, world_size=world, gain_reference=reference,
                     gain_min=d_min, gain_compressed=d_c, gain_measured=True, sent=sent, **kw)


def run(agent, n, throughput=lambda cf: cf, d_min=1.0, d_c=0.9):
    """Feed ``n`` steps; the scripted throughput T_sys·δ depends on the CF sent."""
    decision, sent_cfs = agent.initial_decision(), []
    for step in range(n):
        cf = {"compressed": decision.cf, "min": decision.theta_min, "dense": 1.0}[decision.send]
        gain = {"compressed": d_c, "min": d_min, "dense": 1.0}[decision.send]
        sent_cfs.append(cf)
        decision = agent.decide(stats(step, d_min, d_c, iter_time=gain / throughput(cf),
                                      sent=decision.send))
    return sent_cfs, decision


def distinct(seq):
    out = []
    for x in seq:
        if not out or out[-1] != x:
            out.append(x)
    return out


def test_exponential_policy_visits_10_20_40_160_then_theta_max():
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.7, omega=0.01,
                     search="throughput", window=5,
                     policy="exponential", ewma=1.0, settle_steps=0)
    cfs, _ = run(agent, 40)
    assert distinct(cfs) == [10, 20, 40, 160, 1000]


def test_geometric_policy_doubles():
    agent = A.GraVAC(theta_min=10, theta_max=2000, window=3, policy="geometric",
                     search="throughput", ewma=1.0,
                     settle_steps=0)
    cfs, _ = run(agent, 30)
    assert distinct(cfs)[:6] == [10, 20, 40, 80, 160, 320]


def test_saturation_example_from_the_paper_stays_at_1280x():
    """Throughput 1029.9 at 1280x vs 1035.4 at 2000x, ω = 1% → the lower CF, 1280x."""
    table = {1280: 1029.9, 2000: 1035.4}
    agent = A.GraVAC(theta_min=10, theta_max=2000, epsilon=0.7, omega=0.01,
                     search="throughput", window=4,
                     policy="geometric", ewma=1.0, omega_throughput=0.01, settle_steps=0)
    cfs, decision = run(agent, 80, throughput=lambda cf: table.get(cf, 2 * cf / 10 + 100))
    assert distinct(cfs)[-3:] == [1280, 2000, 1280]
    assert cfs[-1] == 1280 and not agent.searching
    assert decision.cf == 1280


def test_sends_theta_min_when_only_the_floor_keeps_enough_gain():
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.7, window=2,
                     search="throughput", ewma=1.0,
                     settle_steps=0)
    _, decision = run(agent, 10, d_min=0.8, d_c=0.5)  # δc < ε ≤ δmin
    assert decision.send == "min" and decision.theta_min == 10


def test_sends_dense_when_both_gains_are_below_epsilon():
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.7, window=2,
                     search="throughput", ewma=1.0,
                     settle_steps=0)
    _, decision = run(agent, 10, d_min=0.5, d_c=0.3)
    assert decision.send == "dense"


def test_theta_min_scales_up_when_gains_are_within_omega():
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.7, omega=0.05,
                     search="throughput", window=3,
                     policy="geometric", ewma=1.0, settle_steps=0)
    run(agent, 3, d_min=1.0, d_c=0.98)  # warm-up ends: explore 20
    assert agent.theta_min == 10
    run(agent, 3, d_min=1.0, d_c=0.98)  # |δmin − δc|/δmin = 2% ≤ 5% → θmin ← 20
    assert agent.theta_min == 20
    assert agent.candidate_cf == 80  # θs doubled to 4


def test_ewma_is_bias_corrected_with_world_size_over_100():
    """α = N/100 = 0.04 (window 1000: 5/window = 0.005 is smaller). Bias-corrected, the first
    value counts once, not as if it had been seen forever: (1 − α)·1 + α·0 over 1 − (1 − α)²."""
    agent = A.GraVAC(search="throughput", window=1000, settle_steps=0)
    agent.decide(stats(0, d_min=1.0, d_c=1.0, world=4))
    assert agent.delta_min == pytest.approx(1.0)  # one value: exactly it, not α·it
    agent.decide(stats(1, d_min=0.0, d_c=0.0, world=4))
    assert agent.delta_min == pytest.approx(0.96 * 0.04 / (1 - 0.96 ** 2))  # 0.4898
    for step in range(2, 400):
        agent.decide(stats(step, d_min=0.5, d_c=0.5, world=4))
    assert agent.delta_min == pytest.approx(0.5, abs=1e-6)  # converges to the measured value


def test_default_smoothing_fits_five_time_constants_into_a_window():
    def alpha(world_size, **kw):
        return A.GraVAC(search="throughput", **kw).alpha(world_size=world_size)
    assert alpha(2, window=50) == pytest.approx(0.1)  # 5/50 > 2/100
    assert alpha(32, window=500) == pytest.approx(0.32)  # the paper's N/100
    assert alpha(2, window=50, ewma=0.3) == 0.3
    assert alpha(2, window=100, gain_interval=4) == pytest.approx(0.2)
    assert alpha(2, window=10, gain_interval=4) == 1.0
    # the cost model measures ten times a window: 5 time constants of 2 measurements
    assert A.GraVAC(window=50).gain_interval == 5
    assert A.GraVAC(window=50).alpha(world_size=2) == pytest.approx(0.5)


@pytest.mark.parametrize("gain,expected", [
    # terms: reference (denominator) and the numerators of the two levels, as measured
    ("fresh", (0.8, 0.5)), ("error_fed", (0.8, 0.5)), ("authors", (0.8, 0.5))])
def test_each_gain_definition_divides_its_terms(gain, expected):
    agent = A.GraVAC(search="throughput", window=100, gain=gain, ewma=1.0, settle_steps=0)
    agent.decide(stats(0, d_min=4.0, d_c=2.5, reference=5.0))
    assert (agent.delta_min, agent.delta_c) == pytest.approx(expected)


def test_authors_gain_averages_numerator_and_denominator_over_25_steps_and_may_exceed_1():
    agent = A.GraVAC(search="throughput", window=1000, gain="authors", settle_steps=0)
    for step in range(30):  # 5 old steps drop out of the 25-step window
        num, ref = (100.0, 1.0) if step < 5 else (3.0, 2.0 + step % 2)
        agent.decide(stats(step, d_min=num, d_c=num / 2, reference=ref))
    refs = [2.0 + s % 2 for s in range(5, 30)]
    assert agent.delta_min == pytest.approx(3.0 * 25 / sum(refs))  # mean(num) / mean(ref)
    assert agent.delta_min > 1  # Σ‖C(g + e)‖ may exceed Σ‖g‖
    assert agent.delta_c == pytest.approx(agent.delta_min / 2)


def test_gain_measures_name_what_the_optimizer_measures():
    assert A.GAINS["fresh"] == A.GainMeasure(compressed="gradient", reference="gradient", power=2)
    assert A.GAINS["error_fed"] == A.GainMeasure("compensated", "compensated", 2)
    assert A.GAINS["authors"] == A.GainMeasure("compensated", "gradient", 1)
    assert A.GraVAC(search="throughput", gain="authors").gain_measure.power == 1


def test_unmeasured_steps_leave_the_gain_alone_and_gain_interval_marks_decisions():
    agent = A.GraVAC(search="throughput", window=100, gain_interval=4, ewma=1.0, settle_steps=0)
    assert agent.initial_decision().measure_gain
    marks = []
    for step in range(8):
        measured = step % 4 == 0
        d = agent.decide(StepStats(step=step, iter_time=1.0, world_size=1, gain_reference=1.0,
                                   gain_min=0.9 if measured else 0.0, gain_compressed=0.8 if
                                   measured else 0.0, gain_measured=measured, sent=agent.send))
        marks.append(d.measure_gain)
        assert agent.delta_min == pytest.approx(0.9)
    assert marks == [False, False, False, True, False, False, False, True]  # for steps 1..8


def test_candidate_gain_restarts_and_settles_when_the_candidate_changes():
    agent = A.GraVAC(theta_min=10, theta_max=1000, window=4, ewma=0.5,
                     search="throughput", settle_steps=2,
                     policy="geometric")
    seen = []
    for step in range(12):
        agent.decide(stats(step, d_min=1.0, d_c=0.2 if step < 8 else 0.9, sent=agent.send))
        seen.append((agent.candidate_cf, agent.delta_c))
    # the first 2 steps of the run are not measured; the warm-up measures candidate 20
    assert seen[1][1] is None and seen[2][1] == pytest.approx(0.2)
    assert seen[3] == (20, pytest.approx(0.2))  # warm-up over: 20 is now sent, same mean
    assert seen[7] == (40, None)  # second window over: new candidate, its mean restarts
    assert seen[8][1] is None and seen[9][1] is None  # settling after the change
    assert seen[10][1] == pytest.approx(0.9)  # a fresh mean: the old 0.2 is forgotten


def test_two_tolerances_scale_up_by_gain_gap_and_saturate_by_throughput():
    # gap 3%: within omega=5% → θmin scales up; the paper's 1% would not
    for omega, theta_min in ((0.05, 20), (0.01, 10)):
        agent = A.GraVAC(theta_min=10, theta_max=1000, omega=omega, window=3,
                         search="throughput", ewma=1.0,
                         policy="geometric", settle_steps=0, omega_throughput=0.0)
        run(agent, 6, d_min=1.0, d_c=0.97)
        assert agent.theta_min == theta_min
    # throughput 4% apart: saturated under omega_throughput=5% (stops at the lower CF),
    # still searching under 1%
    table = {10: 100.0, 20: 104.0}
    for omega_t, searching in ((0.05, False), (0.01, True)):
        agent = A.GraVAC(theta_min=10, theta_max=1000, omega=0.0, window=3,
                         search="throughput", ewma=1.0,
                         policy="geometric", settle_steps=0, omega_throughput=omega_t)
        cfs, decision = run(agent, 6, throughput=lambda cf: table.get(cf, 1.0), d_c=1.0)
        assert agent.searching is searching
        if not searching:
            assert decision.cf == 10


def test_search_that_reaches_theta_max_settles_at_the_best_throughput():
    """Candidates above 40x lose too much gain to be sent; at θmax the search is over and
    GraVAC stays at the CF with the best compression throughput instead of θmin."""
    table = {10: 50.0, 20: 90.0, 40: 100.0, 160: 60.0}
    agent = A.GraVAC(theta_min=10, theta_max=1000, window=5, ewma=1.0,
                     search="throughput", settle_steps=0,
                     omega=0.0, omega_throughput=0.01)
    decision, sent = agent.initial_decision(), []
    for step in range(60):
        cf = {"compressed": decision.cf, "min": decision.theta_min}[decision.send]
        sent.append(cf)
        d_c = 0.9 if agent.candidate_cf <= 160 else 0.3
        decision = agent.decide(stats(step, 1.0, d_c, iter_time=1.0 / table.get(cf, 1.0),
                                      sent=decision.send))
    assert distinct(sent) == [10, 20, 40, 160, 1000, 10, 40]  # 1000 once, until measured
    assert not agent.searching and decision.cf == 40 and decision.send == "compressed"


def settle_then(agent, gains, lrs=None, steps_per_phase=20):
    """Settle ``agent`` (as in the θmax test), then feed phases of (δc, lr); the sent CFs."""
    table = {10: 50.0, 20: 90.0, 40: 100.0, 160: 60.0}
    decision, sent, phase_of = agent.initial_decision(), [], []
    phases = [(0.9, 0.1)] * 12 + [(g, lr) for g, lr in zip(gains, lrs or [0.1] * len(gains))]
    for i, (d_c, lr) in enumerate(phases):
        for step in range(i * steps_per_phase, (i + 1) * steps_per_phase):
            cf = {"compressed": decision.cf, "min": decision.theta_min}[decision.send]
            sent.append(cf)
            phase_of.append(i)
            gain = d_c if agent.candidate_cf <= 160 else 0.3
            decision = agent.decide(stats(step, 1.0, gain, iter_time=1.0 / table.get(cf, 1.0),
                                          sent=decision.send, lr=lr))
    return sent, phase_of


def gravac_that_settles(**kw):
    return A.GraVAC(theta_min=10, theta_max=1000, window=5, ewma=1.0,
                    search="throughput", settle_steps=0,
                    omega=0.0, omega_throughput=0.01, **kw)


def test_search_reopens_when_the_settled_gain_drifts_for_two_windows_and_settles_again():
    agent = gravac_that_settles(reopen_tolerance=0.1)
    sent, phase = settle_then(agent, gains=[0.9, 0.9, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75])
    settled = [cf for cf, p in zip(sent, phase) if p == 13]
    assert set(settled) == {40} and agent.reopened == 1
    after = [cf for cf, p in zip(sent, phase) if p >= 15]
    assert after[-1] == 40 and 10 in after and 1000 in after  # searched again from θmin
    assert not agent.searching


def test_one_drifting_window_or_a_drift_within_tolerance_does_not_reopen():
    blip = gravac_that_settles(reopen_tolerance=0.1)
    settle_then(blip, gains=[0.9, 0.9, 0.7, 0.9, 0.9], steps_per_phase=5)
    within = gravac_that_settles(reopen_tolerance=0.1)
    settle_then(within, gains=[0.9, 0.9, 0.85, 0.85, 0.85, 0.85])
    off = gravac_that_settles(reopen_tolerance=None, reopen_lr_ratio=None)
    settle_then(off, gains=[0.9, 0.5, 0.5, 0.5, 0.5], lrs=[0.1, 0.01, 0.01, 0.01, 0.01])
    assert (blip.reopened, within.reopened, off.reopened) == (0, 0, 0)
    assert not (blip.searching or within.searching or off.searching)


def test_a_learning_rate_step_reopens_the_search_a_small_change_does_not():
    decayed = gravac_that_settles()
    settle_then(decayed, gains=[0.9] * 3, lrs=[0.1, 0.01, 0.01])
    assert decayed.reopened == 1
    wobble = gravac_that_settles()
    settle_then(wobble, gains=[0.9] * 3, lrs=[0.1, 0.08, 0.07])
    assert wobble.reopened == 0


def test_cf_never_exceeds_theta_max_and_state_round_trips():
    agent = A.GraVAC(theta_min=10, theta_max=50, window=2, ewma=1.0,
                     search="throughput", settle_steps=0)
    cfs, _ = run(agent, 30)
    assert max(cfs) == 50
    clone = A.GraVAC(theta_min=10, theta_max=50, window=2, ewma=1.0,
                     search="throughput", settle_steps=0)
    clone.load_state_dict(agent.state_dict())
    a, _ = run(agent, 10)
    b, _ = run(clone, 10)
    assert a == b


@pytest.mark.parametrize("kwargs,message", [
    ({"theta_min": 0.5}, "theta_min must be a number >= 1"),
    ({"theta_min": 100, "theta_max": 10}, "theta_max .* must be >= theta_min"),
    ({"epsilon": 0}, r"epsilon must be a number in \(0, 1\]"),
    ({"epsilon": 1.5}, r"epsilon must be a number in \(0, 1\]"),
    ({"omega": -0.1}, r"omega must be a number in \[0, 1\]"),
    ({"omega_throughput": 2}, r"omega_throughput must be a number in \[0, 1\], got 2"),
    ({"gain": "energy"}, "gain must be one of fresh, error_fed, authors, got 'energy'"),
    ({"gain_interval": 0}, "gain_interval must be an integer >= 1, got 0"),
    ({"settle_steps": 10, "window": 5}, r"settle_steps must be an integer in \[0, 4\], got 10"),
    ({"window": 0}, "window must be an integer >= 1"),
    ({"policy": "linear"}, "unknown scaling policy 'linear'"),
    ({"theta_s": 1}, "theta_s must be a number > 1"),
    ({"ewma": 2}, r"ewma must be None or a number in \(0, 1\]"),
    ({"reopen_tolerance": 0}, r"reopen_tolerance must be None or a number > 0, got 0"),
    ({"reopen_confirmations": 0}, "reopen_confirmations must be an integer >= 1, got 0"),
    ({"reopen_lr_ratio": 1}, "reopen_lr_ratio must be None or a number > 1, got 1"),
])
def test_gravac_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        A.GraVAC(search="throughput", **kwargs)


def test_accordion_low_in_critical_regimes_high_otherwise():
    agent = A.Accordion(low_cf=1, high_cf=10, interval=2, eta=0.5)
    norms = [{"a": 10.0, "b": 10.0}] * 4 + [{"a": 2.0, "b": 10.0}] * 2
    decisions = [agent.decide(StepStats(step=i, iter_time=1, world_size=1, layer_norms=n, lr=0.1))
                 for i, n in enumerate(norms)]
    assert decisions[1].cf_for("a") == 1  # first interval: low
    assert decisions[3].cf_for("a") == 10 and decisions[3].cf_for("b") == 10  # stable: high
    assert decisions[5].cf_for("a") == 1 and decisions[5].cf_for("b") == 10  # a changed ≥ η


def test_accordion_lr_decay_forces_low_cf_and_whole_model_mode():
    agent = A.Accordion(low_cf=2, high_cf=20, interval=1, per_layer=False)
    lrs = [0.1, 0.1, 0.1, 0.01]
    out = [agent.decide(StepStats(step=i, iter_time=1, world_size=1, layer_norms={"a": 1.0},
                                  lr=lr)).cf for i, lr in enumerate(lrs)]
    assert out == [2, 20, 20, 2]


def test_static_and_registry():
    assert A.create("static", cf=50).initial_decision() == Decision(cf=50)
    assert A.create("none") is None
    with pytest.raises(ValueError, match="unknown agent 'x'; valid agents: none, static"):
        A.create("x")
    with pytest.raises(ValueError, match="bad parameters"):
        A.create("gravac", window_size=3)
    with pytest.raises(ValueError, match="high_cf .* must be >= low_cf"):
        A.Accordion(low_cf=10, high_cf=2)


def test_metrics_stream_keeps_only_the_recent_steps():
    agent = A.GraVAC(search="throughput", theta_min=2, theta_max=100, window=10)
    for i in range(RECENT_STEPS + 5):
        agent.decide(stats(i, d_min=0.9, d_c=0.8, iter_time=0.1, world=2,
                               sent=agent.send))
    assert len(agent.history) == RECENT_STEPS and agent.history[0]["step"] == 5
    restored = A.GraVAC(search="throughput", theta_min=2, theta_max=100, window=10)
    restored.load_state_dict(agent.state_dict())
    restored.decide(stats(RECENT_STEPS + 5, d_min=0.9, d_c=0.8, iter_time=0.1, world=2,
                              sent=restored.send))
    assert len(restored.history) == RECENT_STEPS


@pytest.mark.parametrize("decision", [
    A.Decision(cf=100),
    A.Decision(cf=250.0, theta_min=10.0, send=A.SEND_MIN, measure_gain=False),
    A.Decision(cf=1.0, theta_min=1.0, send=A.SEND_DENSE),
    A.Decision(cf=4, layer_cf={"b": 2.0, "a": 4.0}),
    A.Decision(cf=4, layer_cf={}),
])
def test_decision_travels_as_a_fixed_length_float_vector(decision):
    layers = ["a", "b", "c"]
    values = decision.encode(layers)
    assert len(values) == A.Decision.encoded_length(layers)
    assert all(isinstance(v, float) for v in values)
    assert A.Decision.decode(values, layers) == decision


def test_decision_with_an_unknown_layer_is_refused():
    with pytest.raises(ValueError, match=r"layer_cf names unknown tensors: \['z'\]"):
        A.Decision(cf=4, layer_cf={"z": 2.0}).encode(["a"])


# -- GraVAC's cost-model search (beyond the paper) ----------------------------------------------
def test_link_model_recovers_latency_and_bandwidth_from_two_cfs():
    from horovod_gravac.agents.costmodel import LinkModel

    model = LinkModel()
    for cf, link_bytes in ((10, 8e6), (80, 1e6)):
        for _ in range(5):  # wait = 0.05 s + bytes / (10 MB/s); compute 0.2 s
            wait = 0.05 + link_bytes / 1e7
            model.add(cf, link_bytes, wait, 0.2 + wait)
    fit = model.fit()
    assert fit.latency == pytest.approx(0.05) and fit.bandwidth == pytest.approx(1e7)
    assert fit.compute == pytest.approx(0.2)
    assert fit.step_time(2e6) == pytest.approx(0.2 + 0.05 + 0.2)


def test_link_model_with_one_cf_charges_all_waiting_to_bytes_and_ignores_a_negative_slope():
    from horovod_gravac.agents.costmodel import LinkModel

    model = LinkModel()
    assert model.fit() is None
    model.add(10, 4e6, 0.4, 0.6)
    fit = model.fit()
    assert (fit.latency, fit.bandwidth, fit.compute) == pytest.approx((0.0, 1e7, 0.2))
    model.add(20, 2e6, 0.5, 0.7)  # less traffic, longer wait: noise, not a link
    fit = model.fit()
    assert fit.seconds_per_byte == 0.0 and fit.latency == pytest.approx(0.45)


LADDER = (10, 20, 40, 80, 160, 320, 640, 1000)


def simulate(agent, steps, bandwidth, gain=lambda cf: 1.0, compute=0.2, latency=0.01):
    """A link of ``bandwidth`` bytes/s: a step at CF c carries 8e6 / c bytes."""
    decision, sent = agent.initial_decision(), []
    for step in range(steps):
        cf = decision.sent_cf
        sent.append(cf)
        wait = latency + 8e6 / cf / bandwidth
        decision = agent.decide(StepStats(
            step=step, iter_time=compute + wait, world_size=4, gain_reference=1.0,
            gain_min=gain(decision.theta_min), gain_compressed=gain(decision.cf),
            gain_measured=True, sent=decision.send, wait_time=wait, link_bytes=8e6 / cf,
            gain_ladder={c: gain(c) for c in LADDER},
            ladder_link_bytes={c: 8e6 / c for c in LADDER}))
    return sent, decision


def falling_gain(cf):  # 1, 0.85, 0.7, 0.55, 0.4 … at 10, 20, 40, 80, 160 …
    import math
    return max(0.05, 1 - 0.15 * math.log2(cf / 10))


def test_cost_model_goes_straight_to_the_best_predicted_cf_without_a_window_on_each():
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.5, window=20, search="cost_model")
    assert agent.ladder == LADDER
    sent, _ = simulate(agent, 60, bandwidth=1e6, gain=falling_gain)
    # predicted δ/t at 10, 20, 40, 80: 0.99, 1.39, 1.71, 1.77; 160's gain 0.4 is below ε
    assert distinct(sent) == [10, 80]
    assert sent.index(80) == 20  # right after the warm-up window
    assert not agent.searching  # the second window end kept 80: still the best
    row = agent.history[-1]
    assert row["link_bandwidth"] == pytest.approx(1e6, rel=0.02)
    assert row["link_latency"] == pytest.approx(0.01, rel=0.2)
    assert row["predicted_step_s"] == pytest.approx(0.2 + 0.01 + 0.1, rel=0.02)


def test_cost_model_keeps_the_highest_gain_when_the_link_is_fast_and_compresses_when_slow():
    fast = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.5, window=20, search="cost_model")
    assert set(simulate(fast, 60, bandwidth=1e12, gain=falling_gain)[0]) == {10}
    slow = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.5, window=20, search="cost_model")
    # the same gain at every CF: the cheapest CF on the wire wins
    assert simulate(slow, 60, bandwidth=1e6)[0][-1] == 1000


def test_cost_model_hysteresis_and_state_round_trip():
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.5, window=20, search="cost_model",
                     omega_throughput=0.5)
    sent, _ = simulate(agent, 60, bandwidth=1e6, gain=falling_gain)
    assert set(sent) == {10}  # θmin's predicted throughput is within 50% of 80's: kept
    copy = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.5, window=20, search="cost_model",
                    omega_throughput=0.5)
    copy.load_state_dict(agent.state_dict())
    assert simulate(copy, 30, bandwidth=2e5, gain=falling_gain) == \
        simulate(agent, 30, bandwidth=2e5, gain=falling_gain)


@pytest.mark.parametrize("kwargs,message", [
    ({"search": "grid"}, "search must be one of throughput, cost_model, got 'grid'"),
    ({"search": "cost_model", "gain": "authors"}, "use gain='fresh' or 'error_fed'"),
])
def test_cost_model_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        A.GraVAC(**kwargs)

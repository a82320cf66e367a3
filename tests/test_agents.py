"""Agent decision logic with scripted statistics (no processes, no tensors)."""
import pytest

from horovod_gravac import agents as A
from horovod_gravac.agents import RECENT_STEPS, Decision, StepStats


def stats(step, d_min=1.0, d_c=0.9, iter_time=1.0, sent="compressed", world=1, **kw):
    return StepStats(step=step, iter_time=iter_time, world_size=world, norm_sq=1.0,
                     norm_sq_min=d_min, norm_sq_compressed=d_c, sent=sent, **kw)


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
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.7, omega=0.01, window=5,
                     policy="exponential", ewma=1.0)
    cfs, _ = run(agent, 40)
    assert distinct(cfs) == [10, 20, 40, 160, 1000]


def test_geometric_policy_doubles():
    agent = A.GraVAC(theta_min=10, theta_max=2000, window=3, policy="geometric", ewma=1.0)
    cfs, _ = run(agent, 30)
    assert distinct(cfs)[:6] == [10, 20, 40, 80, 160, 320]


def test_saturation_example_from_the_paper_stays_at_1280x():
    """Throughput 1029.9 at 1280x vs 1035.4 at 2000x, ω = 1% → the lower CF, 1280x."""
    table = {1280: 1029.9, 2000: 1035.4}
    agent = A.GraVAC(theta_min=10, theta_max=2000, epsilon=0.7, omega=0.01, window=4,
                     policy="geometric", ewma=1.0)
    cfs, decision = run(agent, 80, throughput=lambda cf: table.get(cf, 2 * cf / 10 + 100))
    assert distinct(cfs)[-3:] == [1280, 2000, 1280]
    assert cfs[-1] == 1280 and not agent.searching
    assert decision.cf == 1280


def test_sends_theta_min_when_only_the_floor_keeps_enough_gain():
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.7, window=2, ewma=1.0)
    _, decision = run(agent, 10, d_min=0.8, d_c=0.5)  # δc < ε ≤ δmin
    assert decision.send == "min" and decision.theta_min == 10


def test_sends_dense_when_both_gains_are_below_epsilon():
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.7, window=2, ewma=1.0)
    _, decision = run(agent, 10, d_min=0.5, d_c=0.3)
    assert decision.send == "dense"


def test_theta_min_scales_up_when_gains_are_within_omega():
    agent = A.GraVAC(theta_min=10, theta_max=1000, epsilon=0.7, omega=0.05, window=3,
                     policy="geometric", ewma=1.0)
    run(agent, 3, d_min=1.0, d_c=0.98)  # warm-up ends: explore 20
    assert agent.theta_min == 10
    run(agent, 3, d_min=1.0, d_c=0.98)  # |δmin − δc|/δmin = 2% ≤ 5% → θmin ← 20
    assert agent.theta_min == 20
    assert agent.candidate_cf == 80  # θs doubled to 4


def test_ewma_uses_world_size_over_100():
    agent = A.GraVAC(window=1000)
    agent.decide(stats(0, d_min=1.0, d_c=1.0, world=4))
    agent.decide(stats(1, d_min=0.0, d_c=0.0, world=4))
    assert agent.delta_min == pytest.approx(0.96)


def test_cf_never_exceeds_theta_max_and_state_round_trips():
    agent = A.GraVAC(theta_min=10, theta_max=50, window=2, ewma=1.0)
    cfs, _ = run(agent, 30)
    assert max(cfs) == 50
    clone = A.GraVAC(theta_min=10, theta_max=50, window=2, ewma=1.0)
    clone.load_state_dict(agent.state_dict())
    a, _ = run(agent, 10)
    b, _ = run(clone, 10)
    assert a == b


@pytest.mark.parametrize("kwargs,message", [
    ({"theta_min": 0.5}, "theta_min must be a number >= 1"),
    ({"theta_min": 100, "theta_max": 10}, "theta_max .* must be >= theta_min"),
    ({"epsilon": 0}, r"epsilon must be a number in \(0, 1\]"),
    ({"epsilon": 1.5}, r"epsilon must be a number in \(0, 1\]"),
    ({"omega": -0.1}, "omega must be a number >= 0"),
    ({"window": 0}, "window must be an integer >= 1"),
    ({"policy": "linear"}, "unknown scaling policy 'linear'"),
    ({"theta_s": 1}, "theta_s must be a number > 1"),
    ({"ewma": 2}, r"ewma must be None or a number in \(0, 1\]"),
])
def test_gravac_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        A.GraVAC(**kwargs)


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
    agent = A.GraVAC(theta_min=2, theta_max=100, window=10)
    for i in range(RECENT_STEPS + 5):
        agent.decide(StepStats(step=i, iter_time=0.1, world_size=2, norm_sq=1.0,
                               norm_sq_min=0.9, norm_sq_compressed=0.8, sent=agent.send))
    assert len(agent.history) == RECENT_STEPS and agent.history[0]["step"] == 5
    restored = A.GraVAC(theta_min=2, theta_max=100, window=10)
    restored.load_state_dict(agent.state_dict())
    restored.decide(StepStats(step=RECENT_STEPS + 5, iter_time=0.1, world_size=2, norm_sq=1.0,
                              norm_sq_min=0.9, norm_sq_compressed=0.8, sent=restored.send))
    assert len(restored.history) == RECENT_STEPS

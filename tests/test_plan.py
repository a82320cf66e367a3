"""The error-budgeted layer plan: its dynamic program, its errors, its schedule and state."""
import itertools
import math
import random

import pytest
import torch

import horovod_gravac as hg
from horovod_gravac.agents import (Agent, Decision, ErrorSpec, LayerPlan, StepStats,
                                   plan_layers)
from horovod_gravac.engine import EngineConfig


def brute_force(errors, sizes, budget, levels):
    """Fewest bytes over every choice whose errors, rounded up to budget/levels, fit."""
    names = list(errors)
    unit = budget / levels
    best = math.inf
    for choice in itertools.product(*(range(len(errors[n])) for n in names)):
        weight = sum(math.ceil(errors[n][k] / unit - 1e-9) for n, k in zip(names, choice))
        if weight <= levels:
            best = min(best, sum(sizes[n][k] for n, k in zip(names, choice)))
    return best


def random_instance(rng, tensors, candidates):
    errors, sizes = {}, {}
    for i in range(tensors):
        # a CF ladder: bytes fall and errors grow with the candidate's CF
        sizes[f"t{i}"] = sorted((rng.uniform(1, 100) for _ in range(candidates)), reverse=True)
        errors[f"t{i}"] = sorted(rng.uniform(0, 10) for _ in range(candidates))
    return errors, sizes


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_is_optimal_on_the_discretised_errors_and_meets_the_real_budget(seed):
    rng = random.Random(seed)
    errors, sizes = random_instance(rng, rng.randint(1, 5), rng.randint(2, 4))
    uniform = sum(e[len(e) // 2] for e in errors.values())
    budget, levels = rng.uniform(0.5, 1.5) * uniform, rng.choice([7, 20, 100])
    choice = plan_layers(errors, sizes, budget, levels)
    best = brute_force(errors, sizes, budget, levels)
    if best == math.inf:
        assert choice is None
        return
    assert sum(sizes[n][k] for n, k in choice.items()) == pytest.approx(best)
    assert sum(errors[n][k] for n, k in choice.items()) <= budget * (1 + 1e-12)


def test_within_the_discretisation_the_plan_is_as_good_as_the_exact_optimum():
    """Rounding up loses at most one unit per tensor: the plan is no worse than the exact
    optimum of a budget smaller by that much."""
    rng = random.Random(7)
    for _ in range(30):
        errors, sizes = random_instance(rng, 4, 3)
        budget, levels = sum(e[1] for e in errors.values()), 50
        choice = plan_layers(errors, sizes, budget, levels)
        tighter = budget - 4 * budget / levels
        exact = min((sum(sizes[n][k] for n, k in zip(errors, c)) for c in
                     itertools.product(range(3), repeat=4)
                     if sum(errors[n][k] for n, k in zip(errors, c)) <= tighter), default=None)
        if exact is not None:
            assert sum(sizes[n][k] for n, k in choice.items()) <= exact + 1e-9


def test_a_zero_budget_takes_only_error_free_candidates():
    errors = {"a": [0.0, 1.0], "b": [0.0, 0.0]}
    sizes = {"a": [10.0, 1.0], "b": [10.0, 1.0]}
    assert plan_layers(errors, sizes, 0.0, 10) == {"a": 0, "b": 1}
    assert plan_layers({"a": [1.0]}, {"a": [1.0]}, 0.0, 10) is None


def test_projection_errors_are_the_exact_compression_errors():
    torch.manual_seed(0)
    g = torch.randn(300, 200)
    cfs = (5.0, 20.0, 80.0)
    topk = hg.compression.create("topk")
    exact = [torch.linalg.vector_norm(g - topk.decompress(*topk.compress(g, cf=cf))).square()
             for cf in cfs]
    torch.testing.assert_close(topk.error_profile(g, cfs), torch.stack(exact), rtol=1e-4,
                               atol=1e-3)
    psgd = hg.compression.create("powersgd")
    psgd.qs["w"] = torch.linalg.qr(torch.randn(200, 24)).Q  # a warm Q: CF 5 is rank 24
    errors = psgd.error_profile(g, cfs, "w")
    for cf, error in zip(cfs, errors):
        payload, ctx = psgd.compress(g, "w", cf=cf)  # this rank's P̂P̂ᵀM, before any exchange
        p_hat = torch.linalg.qr(payload[0]).Q
        local = p_hat @ (p_hat.t() @ g)
        torch.testing.assert_close(error, torch.linalg.vector_norm(g - local).square(),
                                   rtol=1e-4, atol=1e-2)
    assert (errors[1:] >= errors[:-1] - 1e-3).all()  # fewer ranks, more error


def test_sampled_errors_estimate_the_exact_ones():
    torch.manual_seed(1)
    g = torch.randn(512, 512) * torch.rand(512, 1) ** 3  # rows of very different energy
    topk = hg.compression.create("topk")
    cfs = (10.0, 100.0)
    exact, estimate = topk.error_profile(g, cfs), topk.error_profile(g, cfs, sample=16384)
    torch.testing.assert_close(estimate, exact, rtol=0.05, atol=0)


def test_an_unbiased_random_k_error_is_its_variance():
    g = torch.randn(10_000)
    randomk = hg.compression.create("randomk", unbiased=True)
    expected = (100 - 1) * g.pow(2).sum()  # E‖(n/k) g_S − g‖² = (n/k − 1)‖g‖²
    torch.testing.assert_close(randomk.error_profile(g, (100.0,))[0], expected, rtol=1e-5,
                               atol=0)
    drawn = torch.stack([torch.linalg.vector_norm(g - randomk.decompress(*randomk.compress(
        g, "g", step, cf=100))).square() for step in range(20)]).mean()
    assert drawn == pytest.approx(float(expected), rel=0.1)


def stats(step, errors=None, link_bytes=None):
    return StepStats(step=step, iter_time=0.1, world_size=2, errors_measured=errors is not None,
                     layer_errors=errors or {}, candidate_link_bytes=link_bytes or {})


def test_the_plan_measures_the_last_steps_of_each_interval_and_scales_with_the_uniform_cf():
    plan = LayerPlan(hg.agents.Static(cf=10), plan_interval=5, measure_steps=2,
                     factors=(0.5, 1, 2))
    marked = [plan.initial_decision().measure_errors]
    # a large tensor whose error grows little with its CF, a small one whose error grows
    # fast: the large one goes up (−500 bytes, +0.05 error), the small one down (+10 bytes,
    # −1.0 error); a up alone would exceed the uniform error (0.25 + 2.0 > 0.2 + 2.0)
    errors = {"a": (10.0, 0.1, 0.2, 0.25), "b": (10.0, 1.0, 2.0, 4.0)}
    link_bytes = {"a": (2000.0, 1000.0, 500.0), "b": (20.0, 10.0, 5.0)}
    decisions = []
    for step in range(10):
        measured = marked[-1]
        d = plan.decide(stats(step, errors if measured else None,
                              link_bytes if measured else None))
        marked.append(d.measure_errors)
        decisions.append(d)
    assert marked[:10] == [False, False, False, True, True] * 2
    assert decisions[3].layer_cf is None  # nothing planned before the first interval's end
    assert decisions[4].layer_cf == {"a": 20.0, "b": 5.0}
    assert all(d.layer_cf == {"a": 20.0, "b": 5.0} for d in decisions[4:9])
    row = plan.agent.history[-1]
    assert row["plan_error_ratio"] == pytest.approx(1.25 / 2.2)
    assert row["plan_bytes_ratio"] == pytest.approx(520 / 1010)


class Scheduled(Agent):
    """A time-level agent whose CF follows a fixed schedule (one CF per step)."""

    name = "scheduled"

    def __init__(self, cfs):
        super().__init__()
        self.cfs, self.step = cfs, 0

    def initial_decision(self):
        return Decision(cf=self.cfs[0])

    def decide(self, stats):
        self.step = stats.step + 1
        return Decision(cf=self.cfs[self.step])


def test_a_new_uniform_cf_drops_the_plan_and_plans_again_at_it_soon():
    plan = LayerPlan(Scheduled([10.0] * 15 + [40.0] * 15), plan_interval=10, measure_steps=2,
                     factors=(0.5, 1, 2))
    errors = {"a": (10.0, 0.1, 0.2, 0.25), "b": (10.0, 1.0, 2.0, 4.0)}
    link_bytes = {"a": (2000.0, 1000.0, 500.0), "b": (20.0, 10.0, 5.0)}
    d, decisions = plan.initial_decision(), []
    for step in range(25):
        d = plan.decide(stats(step, errors if d.measure_errors else None,
                              link_bytes if d.measure_errors else None))
        decisions.append(d)  # the decision for step + 1
    assert decisions[9].layer_cf == {"a": 20.0, "b": 5.0}  # planned at CF 10 after step 9
    assert decisions[13].layer_cf == {"a": 20.0, "b": 5.0}
    assert decisions[14].cf == 40.0 and decisions[14].layer_cf is None  # dropped at CF 40
    assert [x.measure_errors for x in decisions[13:17]] == [False, True, True, False]
    assert decisions[16].layer_cf == {"a": 80.0, "b": 20.0}  # planned again at CF 40
    assert plan.plans == 2


def test_the_state_of_a_plan_round_trips_and_reloads_with_weights_only(tmp_path):
    plan = LayerPlan(hg.agents.Static(cf=10), alpha=1.2, plan_interval=4, measure_steps=2)
    # a keeps its error at any CF: it goes to 8x within the budget's slack
    errors = {"a": tuple([1.0] + [0.01] * len(plan.factors)),
              "b": tuple([1.0] + [0.5 * f for f in plan.factors])}
    link_bytes = {n: tuple(100.0 / f for f in plan.factors) for n in errors}
    d = plan.initial_decision()
    for step in range(7):
        d = plan.decide(stats(step, errors if d.measure_errors else None,
                              link_bytes if d.measure_errors else None))
    torch.save(plan.state_dict(), tmp_path / "plan.pt")
    again = LayerPlan(hg.agents.Static(cf=10), alpha=1.2, plan_interval=4, measure_steps=2)
    again.load_state_dict(torch.load(tmp_path / "plan.pt", weights_only=True))
    assert again.plan == plan.plan and again.plan
    assert again.errors == plan.errors and again.measured_for == plan.measured_for
    nxt = stats(7, errors, link_bytes)
    assert again.decide(nxt) == plan.decide(nxt)


def test_the_decision_carries_the_measure_flag_through_its_encoding():
    layers = ["a", "b"]
    d = Decision(cf=10.0, layer_cf={"a": 40.0}, measure_errors=True, measure_gain=False)
    assert Decision.decode(d.encode(layers), layers) == d


def test_error_spec_candidates_are_factors_of_the_uniform_cf_and_never_below_one():
    spec = ErrorSpec((0.25, 1.0, 4.0))
    assert spec.cfs(2.0) == (1.0, 2.0, 8.0)
    assert spec.decode([1, 2, 3, 4, 5, 6, 7, 8], ["a", "b"]) == {"a": (1, 2, 3, 4),
                                                                 "b": (5, 6, 7, 8)}


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0}, "alpha must be a number > 0, got 0"),
    ({"alpha": -1.0}, "alpha must be a number > 0, got -1.0"),
    ({"plan_interval": 0}, "plan_interval must be an integer >= 1, got 0"),
    ({"factors": ()}, "factors must be a non-empty list"),
    ({"factors": (0.5, 2.0)}, "factors must contain 1"),
    ({"factors": (1.0, 0.0)}, "factors[1] must be a number > 0, got 0.0"),
    ({"plan_interval": 5, "measure_steps": 6}, "measure_steps must be an integer in [1, 5], got 6"),
    ({"sample": 0}, "sample must be None or an integer >= 1, got 0"),
])
def test_bad_plan_settings_raise_naming_the_value_and_the_range(kwargs, message):
    with pytest.raises(ValueError) as err:
        LayerPlan("static", **kwargs)
    assert message in str(err.value)


def test_a_plan_needs_a_time_level_agent_with_one_cf():
    with pytest.raises(ValueError, match="needs a time-level agent"):
        LayerPlan("none")
    with pytest.raises(ValueError, match="per_layer=True"):
        LayerPlan(hg.agents.Accordion())  # per-layer norms by default
    assert LayerPlan(hg.agents.Accordion(per_layer=False)).name == "accordion+plan"


def test_an_agent_with_a_plan_refuses_a_compressor_without_a_cf():
    with pytest.raises(ValueError, match="sets the compression factor"):
        EngineConfig.create("qsgd", agent=LayerPlan("static"))

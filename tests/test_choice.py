"""CodecChoice and compression candidates: the choice on constructed costs, the set's
refusals, and the engine sending what the decision names (one process)."""
import pytest
import torch

import horovod_gravac as hg
from horovod_gravac import agents as A
from horovod_gravac import compression as C
from horovod_gravac.engine import EngineConfig, StepEngine, step_traffic
from horovod_gravac.transport.horovod import HorovodTransport

MB = 2**20


def stats(step, codec, *, step_time, wait, link_bytes, gains, traffic, rounds=2.0):
    """A step's statistics as the engine hands them to rank 0's agent."""
    return A.StepStats(step=step, iter_time=step_time, world_size=4, gain_measured=True,
                       gain_reference=1.0, gain_codecs=dict(enumerate(gains)),
                       wait_time=wait, link_bytes=link_bytes, rounds=int(rounds),
                       link_steps=0, codec=codec, codec_traffic=traffic)


def traffic(*link_bytes, rounds=2.0):
    return {k: A.Traffic(b, b, rounds, 0.0) for k, b in enumerate(link_bytes)}


def drive(agent, link_s_per_byte, compute, gains, priced, steps=60):
    """Run ``agent`` on a constructed machine: a step that sends candidate k takes
    compute[k] + its priced bytes × ``link_s_per_byte``. Returns the codecs sent."""
    sent = []
    decision = agent.initial_decision()
    for step in range(steps):
        k = decision.codec
        sent.append(k)
        wait = priced[k].link_bytes * link_s_per_byte
        decision = agent.decide(stats(step, k, step_time=compute[k] + wait, wait=wait,
                                      link_bytes=priced[k].link_bytes, gains=gains,
                                      traffic=priced))
    return sent


NAMES = ("dense", "fp16", "topk:100")
PRICED = traffic(16 * MB, 8 * MB, 0.3 * MB)


def choice(**kwargs):
    agent = A.CodecChoice(interval=10, settle_steps=0, gain_interval=1, **kwargs)
    agent.use_candidates(NAMES, (True, False, False))
    return agent


def test_dense_wins_on_a_fast_link_after_one_look_at_compression():
    # 10 Gbit/s: 16 MB cost 13 ms; TopK's own work costs 60 ms more than it saves
    sent = drive(choice(), 8e-10, compute=(0.1, 0.104, 0.16), gains=(1.0, 1.0, 0.8),
                 priced=PRICED)
    assert sent[:3] == [0] * 3  # the first candidate on trial, every gain measured from step 0
    assert sent[-20:] == [0] * 20 or sent[-20:] == [1] * 20  # dense, or fp16 within ω
    assert sent.count(2) <= 3  # TopK was sent on trial only, to measure it


def test_compression_wins_on_a_slow_link():
    # 100 Mbit/s: 16 MB cost 1.3 s; TopK keeps 80% of the gradient's energy at 2% of it
    sent = drive(choice(), 8e-8, compute=(0.1, 0.104, 0.16), gains=(1.0, 1.0, 0.8),
                 priced=PRICED)
    assert sent[-30:] == [2] * 30


def test_a_trial_clearly_worse_after_one_timed_step_ends_there():
    # 100 Mbit/s: the dense start's one timed step (1.4 s) scores it ~10x below TopK
    sent = drive(choice(), 8e-8, compute=(0.1, 0.104, 0.16), gains=(1.0, 1.0, 0.8),
                 priced=PRICED)
    assert sent[:2] == [0, 2]
    patient = drive(choice(trial_cutoff=1000), 8e-8, compute=(0.1, 0.104, 0.16),
                    gains=(1.0, 1.0, 0.8), priced=PRICED)
    assert patient[:4] == [0, 0, 0, 2]  # trial_steps=3 timed steps otherwise
    # 10 Gbit/s: within the cutoff, every trial runs its course
    fast = drive(choice(), 8e-10, compute=(0.1, 0.104, 0.16), gains=(1.0, 1.0, 0.8),
                 priced=PRICED)
    assert fast[:3] == [0] * 3
    with pytest.raises(ValueError, match="trial_cutoff must be a number > 1, got 1"):
        A.CodecChoice(trial_cutoff=1)


def test_a_candidate_sent_is_priced_by_its_own_steps_where_the_link_model_misses():
    # unshaped Gloo on a CPU: fp16's sum is slow (0.3 s beyond its bytes), which no price per
    # byte, round or message explains; the fitted model alone would keep fp16 (half the bytes)
    agent, decision, sent = choice(), None, []
    decision = agent.initial_decision()
    slow = {0: 0.0, 1: 0.3, 2: 0.0}
    for step in range(60):
        k = decision.codec
        sent.append(k)
        wait = PRICED[k].link_bytes * 8e-10 + slow[k]
        decision = agent.decide(stats(step, k, step_time=(0.1, 0.104, 0.16)[k] + wait, wait=wait,
                                      link_bytes=PRICED[k].link_bytes, gains=(1.0, 1.0, 0.8),
                                      traffic=PRICED))
    assert sent[-20:] == [0] * 20
    predicted = agent.predicted_times(agent.costs.link())
    assert predicted[1] == pytest.approx(0.104 + 8 * MB * 8e-10 + 0.3)


def test_a_candidate_below_epsilon_is_never_sent_however_fast():
    sent = drive(choice(epsilon=0.9), 8e-8, compute=(0.1, 0.104, 0.16),
                 gains=(1.0, 1.0, 0.8), priced=PRICED)
    assert 2 not in sent and sent[-30:] == [1] * 30  # fp16 halves the bytes


def test_hysteresis_keeps_the_codec_sent_within_omega():
    # fp16 saves 0.3% of the step: within ω = 5%, dense stays
    sent = drive(choice(omega=0.05), 1e-12, compute=(0.1, 0.1, 0.5), gains=(1.0, 1.0, 0.8),
                 priced=PRICED)
    assert set(sent) == {0}


def test_one_measured_candidate_charges_its_waiting_to_bytes():
    link = A.fit_link([(2.0, 6.0, 16e6, 0.4)])
    assert link.per_round == 0 and link.per_step == 0
    assert link.per_byte == pytest.approx(0.4 / 16e6)


def test_the_decision_carries_the_codec_through_its_broadcast_encoding():
    layers = ["a", "b"]
    for codec in (None, 0, 3):
        decision = A.Decision(cf=None, codec=codec, send=A.SEND_COMPRESSED)
        assert A.Decision.decode(decision.encode(layers), layers) == decision
    assert len(A.Decision(cf=None).encode(layers)) == A.Decision.encoded_length(layers)


def test_the_agent_state_round_trips_and_decides_alike():
    a, b = choice(), choice()
    drive(a, 8e-8, compute=(0.1, 0.104, 0.16), gains=(1.0, 1.0, 0.8), priced=PRICED, steps=25)
    b.load_state_dict(a.state_dict())
    more = stats(25, a.codec, step_time=0.2, wait=0.1, link_bytes=1e6, gains=(1.0, 1.0, 0.8),
                 traffic=PRICED)
    assert a.decide(more) == b.decide(more)


@pytest.mark.parametrize("spec, match", [
    ("dense|", "two or more specs"),
    ("topk", None),  # one compressor is no set
    ("|", "two or more specs"),
    ("dense|topk:100|topk:100", "'topk:100' repeats 'topk:100'"),
    ("dense|topk:cf=100|topk:100", "repeats"),
    ("dense|nothing", "unknown compressor 'nothing'"),
    ("dense|auto", "'auto' is itself a set"),
    ("dense|efsignsgd", "memory of their own"),
])
def test_bad_candidate_sets_are_refused_naming_them(spec, match):
    if match is None:
        assert not isinstance(C.create(spec), C.Candidates)
        return
    with pytest.raises(ValueError, match=match):
        C.create(spec)


def test_an_agent_and_a_set_must_fit_each_other():
    with pytest.raises(ValueError, match="agent='choice'"):
        EngineConfig.create("dense|topk:100")
    with pytest.raises(ValueError, match="does not choose among"):
        EngineConfig.create("dense|topk:100", agent="gravac")
    with pytest.raises(ValueError, match="compression='auto'"):
        EngineConfig.create("topk:100", agent="choice")
    with pytest.raises(ValueError, match="start=3 names no candidate"):
        EngineConfig.create("dense|topk:100", agent=A.CodecChoice(start=3))
    with pytest.raises(ValueError, match="leave factors out"):
        A.LayerPlan(A.CodecChoice(), factors=(1, 2))
    with pytest.raises(ValueError, match="does not choose among"):
        EngineConfig.create("dense|topk:100", agent=A.LayerPlan("static"))
    with pytest.raises(ValueError, match="compression='auto'"):
        EngineConfig.create("topk:100", agent=A.LayerPlan(A.CodecChoice()))
    config = EngineConfig.create("auto", agent="choice")
    assert isinstance(config.memory, C.ResidualMemory)  # TopK and PowerSGD drop something
    assert not config.compressor.preserves_adam


class Scripted(A.Agent):
    """Sends the codecs of ``plan`` step by step (a deterministic switch)."""

    name = "scripted"
    sets_cf = False
    chooses_codec = True

    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def use_candidates(self, names, dense):
        pass

    def initial_decision(self):
        return A.Decision(cf=None, codec=self.plan[0], measure_gain=False)

    def decide(self, stats):
        return A.Decision(cf=None, codec=self.plan[min(stats.step + 1, len(self.plan) - 1)],
                          measure_gain=False)


def test_the_engine_sends_the_named_codec_and_the_residual_carries_across_a_switch():
    torch.manual_seed(0)
    config = EngineConfig.create("topk:4|powersgd:1|dense", agent=Scripted([0, 1, 2]),
                                 min_compress_numel=0)
    shape = torch.Size([16, 8])
    import horovod.torch as hvd
    hvd.init()  # one process: the collectives return what they are given
    engine = StepEngine(config, HorovodTransport(), [("w", shape, 4)])
    grads = [torch.randn(shape) for _ in range(3)]
    sent, bytes_ = [], []
    for grad in grads:
        engine.begin("w", grad.clone())
        engine.finish(lambda name, t: sent.append(t.clone()))
        bytes_.append(engine.communication.last_bytes)
    # TopK keeps 32 of 128 values (with their positions); what it dropped is the residual
    top = grads[0].flatten().abs().topk(32).indices
    assert torch.equal(sent[0].flatten()[top], grads[0].flatten()[top])
    residual = grads[0].clone()
    residual.view(-1)[top] = 0
    # PowerSGD compresses g + the TopK residual, and keeps its own error for the next step
    powersgd_input = grads[1] + residual
    assert bytes_[1] == 4 * (16 + 8)  # P and Q of rank 1
    # the dense step sends g + everything still owed, and the residual restarts at zero
    owed = powersgd_input - sent[1] + grads[2]
    assert torch.allclose(sent[2], owed, atol=1e-5)
    assert bytes_[2] == 4 * shape.numel()
    assert not engine.memory.residuals or all(not r.any() for r in engine.memory.residuals.values())


def test_every_candidate_is_priced_from_the_engine_buckets():
    shapes = {"w": torch.Size([256, 128]), "b": torch.Size([128])}
    buckets = (("b", "w"),)
    dense = step_traffic(C.create("none"), shapes, frozenset({"b"}), buckets, 4)
    lowrank = step_traffic(C.create("powersgd:1"), shapes, frozenset({"b"}), buckets, 4)
    gathered = step_traffic(C.create("topk:100"), shapes, frozenset({"b"}), buckets, 4)
    assert dense.rounds == 1 and lowrank.rounds == 2 and gathered.rounds == 1
    assert dense.link_bytes == pytest.approx(2 * 3 / 4 * 4 * (256 * 128 + 128))
    assert lowrank.link_bytes < dense.link_bytes
    # an allgather of TopK's values and positions next to the bias's sum: two collectives
    assert gathered.link_steps == 2 * 3 + 3


def test_candidate_gains_are_one_for_dense_and_fall_with_compression():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    energies = C.create("dense|fp16|topk:10|powersgd:1").energies(x, "w", sample=None)
    gains = energies / x.pow(2).sum()
    assert gains[0] == pytest.approx(1.0) and gains[1] == pytest.approx(1.0, abs=1e-3)
    assert 0 < gains[3] < 1 and 0 < gains[2] < 1


def test_optimizer_front_end_takes_a_set_and_the_choice_agent():
    model = torch.nn.Linear(8, 4)
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(),
                                  compression="dense|topk:4", agent="choice")
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert opt.decisions[-1].codec == 0


def test_a_powersgd_not_sent_is_measured_at_the_energy_its_warm_q_settles_at():
    """Its seeded Q underestimates what a few steps of sending it reach, most at rank 1."""
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(800, 3, generator=generator) @ torch.diag(torch.tensor([5., 2., 1.])) \
        @ torch.randn(3, 200, generator=generator)
    grad = low_rank + 0.5 * torch.randn(800, 200, generator=generator)
    singular = torch.linalg.svdvals(grad).square()
    for rank in (1, 4):
        powersgd = C.create(f"powersgd:{rank}")
        exact = powersgd.settled_energy_profile(grad, [powersgd.cf], "w")[0]
        assert exact == pytest.approx(float(singular[:rank].sum()), rel=1e-4)
        cold = powersgd.energy_profile(grad, [powersgd.cf], "w", sample=16384)[0]
        sketched = powersgd.settled_energy_profile(grad, [powersgd.cf], "w", sample=16384)[0]
        assert cold < sketched <= 1.05 * exact
    candidates = C.create("dense|powersgd:1|topk:10")
    sent = candidates.energies(grad, "w", sample=None, sent=1)
    unsent = candidates.energies(grad, "w", sample=None, sent=0)
    assert sent[0] == unsent[0] == pytest.approx(float(grad.square().sum()), rel=1e-5)
    assert sent[1] < unsent[1] == pytest.approx(float(singular[0]), rel=1e-4)
    assert sent[2] == unsent[2]  # TopK keeps no state: measured alike


def test_a_decision_carries_a_codec_per_tensor_through_its_broadcast_encoding():
    layers = ["emb", "w", "b"]
    d = A.Decision(cf=None, codec=2, layer_codec={"emb": 1, "b": 0}, measure_errors=True)
    assert A.Decision.decode(d.encode(layers), layers) == d
    assert (d.codec_for("emb"), d.codec_for("w"), d.codec_for("b")) == (1, 2, 0)
    with pytest.raises(ValueError, match="layer_codec names unknown tensors"):
        A.Decision(cf=None, codec=0, layer_codec={"x": 1}).encode(layers)


def test_candidate_errors_are_zero_for_dense_exact_for_projections_and_settled_when_unsent():
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(200, 3, generator=generator) @ torch.diag(torch.tensor([5., 2., 1.])) \
        @ torch.randn(3, 100, generator=generator) + 0.1 * torch.randn(200, 100,
                                                                        generator=generator)
    total = float(grad.square().sum())
    candidates = C.create("dense|fp16|topk:10|powersgd:1")
    errors = candidates.errors(grad, "w", sample=None, sent=0)
    assert errors[0] == 0
    assert 0 < errors[1] < 1e-6 * total  # fp16's rounding
    kept = grad.flatten().abs().topk(grad.numel() // 10).values.square().sum()
    assert errors[2] == pytest.approx(total - float(kept), rel=1e-4)
    singular = torch.linalg.svdvals(grad).square()
    assert errors[3] == pytest.approx(total - float(singular[0]), rel=1e-3)  # as it settles
    warm = candidates.errors(grad, "w", sample=None, sent=3)[3]  # its own (seeded) Q
    assert warm >= errors[3] * (1 - 1e-4)


def codec_plan_stats(step, codec, errors=None, link_bytes=None):
    return A.StepStats(step=step, iter_time=0.0, world_size=4, codec=codec,
                       errors_measured=errors is not None, layer_errors=errors or {},
                       candidate_link_bytes=link_bytes or {})


def test_a_plan_over_the_codec_choice_gives_each_tensor_its_codec_within_the_error():
    # candidates dense, TopK, PowerSGD; the agent sends PowerSGD (2), then dense (0)
    plan = A.LayerPlan(Scripted([2] * 12 + [0] * 12), plan_interval=5, measure_steps=2)
    plan.use_candidates(("dense", "topk:100", "powersgd:1"), (True, False, False))
    assert plan.error_probe.width == 4 and plan.error_probe.codecs == 3
    # "emb" sits in a few rows: TopK keeps it almost whole; "w" is low-rank
    errors = {"emb": (10.0, 0.0, 0.1, 3.0), "w": (10.0, 0.0, 6.0, 0.5)}
    link_bytes = {"emb": (1000.0, 20.0, 50.0), "w": (1000.0, 20.0, 50.0)}
    decision, decisions, rows = plan.initial_decision(), [], []
    for step in range(24):
        measured = decision.measure_errors
        decision = plan.decide(codec_plan_stats(step, decision.codec,
                                                errors if measured else None,
                                                link_bytes if measured else None))
        decisions.append(decision)
        rows.append(plan.row())
    # the first plan (after step 4): emb on TopK — fewer bytes, and e 0.1 + 0.5 ≤ 3.0 + 0.5
    assert decisions[4].codec == 2 and decisions[4].layer_codec == {"emb": 1}
    assert rows[4]["plan_bytes_ratio"] == pytest.approx(70 / 100)
    assert rows[4]["plan_error_ratio"] == pytest.approx(0.6 / 3.5)
    # the agent moved to dense: the plan is dropped, and one for dense keeps every tensor
    # dense (its budget is dense's error: none)
    assert decisions[12].codec == 0 and decisions[12].layer_codec is None
    assert all(d.layer_codec is None for d in decisions[12:])
    assert plan.plans >= 3 and plan.planned_for == 0 and plan.plan == {}


def test_the_engine_sends_each_tensor_with_its_planned_codec():
    torch.manual_seed(0)

    class PerTensor(Scripted):
        def initial_decision(self):
            return A.Decision(cf=None, codec=1, layer_codec={"v": 0}, measure_gain=False)

    config = EngineConfig.create("topk:4|powersgd:1", agent=PerTensor([1]),
                                 min_compress_numel=0)
    shape = torch.Size([16, 8])
    import horovod.torch as hvd
    hvd.init()
    engine = StepEngine(config, HorovodTransport(), [("w", shape, 4), ("v", shape, 4)])
    grads = {"w": torch.randn(shape), "v": torch.randn(shape)}
    sent = {}
    for name in ("v", "w"):
        engine.begin(name, grads[name].clone())
    engine.finish(lambda name, t: sent.__setitem__(name, t.clone()))
    per_tensor = engine.communication.last_step
    assert per_tensor["w"] == 4 * (16 + 8)  # PowerSGD rank 1: P and Q
    assert int((sent["v"] != 0).sum()) == 32  # TopK 4x keeps 32 of 128
    assert torch.linalg.matrix_rank(sent["w"]) == 1


def test_a_codec_plan_under_the_adam_phases_round_trips_through_a_checkpoint(tmp_path):
    def agent():
        plan = A.LayerPlan(A.CodecChoice(interval=5, settle_steps=0, gain_interval=1),
                           plan_interval=4, measure_steps=2)
        phases = A.AdamPhases(plan, A.FreezeRule(warmup=1, max_warmup=2))
        phases.use_candidates(NAMES, (True, False, False))
        return phases

    errors = {"emb": (10.0, 0.0, 0.1, 3.0), "w": (10.0, 0.0, 6.0, 0.5)}
    link_bytes = {"emb": (1000.0, 20.0, 50.0), "w": (1000.0, 20.0, 50.0)}

    def step(a, n, d):
        measured = d.measure_errors
        return a.decide(A.StepStats(
            step=n, iter_time=0.1, world_size=4, gain_measured=True, gain_reference=1.0,
            gain_codecs={0: 1.0, 1: 0.9, 2: 0.8}, codec=d.codec, codec_traffic=PRICED,
            wait_time=0.05, link_bytes=1e6, rounds=2, errors_measured=measured,
            layer_errors=errors if measured else {},
            candidate_link_bytes=link_bytes if measured else {}))

    first = agent()
    d = first.initial_decision()
    for n in range(12):
        d = step(first, n, d)
    torch.save(first.state_dict(), tmp_path / "agent.pt")
    again = agent()
    again.load_state_dict(torch.load(tmp_path / "agent.pt", weights_only=True))
    assert again.frozen_at == first.frozen_at and again.agent.plans == first.agent.plans > 0
    assert again.agent.agent.codec == first.agent.agent.codec
    assert step(again, 12, d) == step(first, 12, d)


def test_a_plan_saved_before_it_planned_codecs_loads():
    plan = A.LayerPlan(A.Static(cf=10), plan_interval=4, measure_steps=2)
    old = {k: v for k, v in plan.state_dict().items()
           if k not in ("planned_for", "errors_for", "measured_for")}
    old.update(plan={"w": 2.0}, planned_cf=10.0, errors_cf=None, measured_cf=10.0)
    again = A.LayerPlan(A.Static(cf=10), plan_interval=4, measure_steps=2)
    again.load_state_dict(old)
    assert (again.plan, again.planned_for, again.measured_for) == ({"w": 2.0}, 10.0, 10.0)
    assert not hasattr(again, "planned_cf")

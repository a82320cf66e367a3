"""Checkpoint/resume on real ranks: an interrupted job must end bit for bit like a whole one.

argv: mode (whole | first | resume | convert) checkpoint-dir
  whole   train STEPS steps; report parameters and decisions
  first   train SPLIT steps, then save a checkpoint per configuration
  resume  load those checkpoints, train to STEPS; also check refusals (wrong compressor,
          missing file)
  convert load a checkpoint written by another world size: refused, then converted on purpose
"""
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import horovod_gravac as hg
from horovod_gravac import checkpoint
from tests.multirank import init_with_digits_shard, report

STEPS, SPLIT = 40, 17
RANK, SIZE, X, Y = init_with_digits_shard()
MODE, DIRECTORY = sys.argv[1], Path(sys.argv[2])


def gravac(policy):
    # omega_throughput=0 and a search that does not reach theta_max within the run: no
    # decision depends on measured throughput, so two runs decide alike
    return hg.agents.GraVAC(theta_min=2, theta_max=1e6, epsilon=0.3, window=8, omega=0.0,
                            omega_throughput=0.0, policy=policy, search="throughput")


CONFIGS = {  # name → (compression, memory, agent factory, momentum of the wrapped SGD)
    "topk_static": ("topk", None, lambda: hg.agents.Static(cf=10), 0.9),
    "dgc_static": ("dgc", "dgc", lambda: hg.agents.Static(cf=10), 0.0),
    "powersgd": ("powersgd", None, lambda: None, 0.9),
    "topk_gravac": ("topk", None, lambda: gravac("exponential"), 0.9),
    "dgc_gravac": ("dgc", "dgc", lambda: gravac("geometric"), 0.0),
    "powersgd_gravac": ("powersgd", None, lambda: gravac("geometric"), 0.9),  # CF → rank
    # the cost-model search; omega_throughput=1 keeps the CF sent (θmin) whatever the
    # measured times, so that two runs decide alike
    "topk_gravac_cost": ("topk", None, lambda: hg.agents.GraVAC(
        theta_min=2, theta_max=64, epsilon=0.3, window=8, omega_throughput=1.0,
        search="cost_model"), 0.9),
    # layer plans under a static and an adaptive agent: the checkpoint falls inside an
    # interval's measured steps (11, 16, 17 of 6-step intervals measuring 2 steps each)
    "topk_static_plan": ("topk", None, lambda: hg.agents.LayerPlan(
        hg.agents.Static(cf=10), plan_interval=6, measure_steps=2), 0.9),
    "powersgd_gravac_plan": ("powersgd", None, lambda: hg.agents.LayerPlan(
        gravac("geometric"), plan_interval=6, measure_steps=2), 0.9),
    # the codec among candidates: TopK 1000x is below ε=0.99 and fp16 is not, so the first
    # choice, after the first candidate's 20-step trial, switches to fp16 from step 20 (after
    # the checkpoint at SPLIT=17)
    "codec_choice": ("topk:1000|fp16", None, lambda: hg.agents.CodecChoice(
        epsilon=0.99, interval=20, gain_interval=1, settle_steps=0, trial_steps=20), 0.9),
}
#: every tensor compressed where a plan has several to plan
OPTIONS = {"topk_static_plan": {"min_compress_numel": 0},
           "powersgd_gravac_plan": {"min_compress_numel": 0}}


def build(name):
    compression, memory, agent, momentum = CONFIGS[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(32, 10))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
                                  named_parameters=model.named_parameters(),
                                  compression=compression, memory=memory, agent=agent(),
                                  **OPTIONS.get(name, {}))
    torch.manual_seed(1000 + RANK)  # per-rank dropout and noise streams
    return model, opt


def train(model, opt, start, stop):
    for step in range(start, stop):
        idx = torch.randint(0, len(X), (32,), generator=torch.Generator().manual_seed(step * 97 + RANK))
        x = X[idx] + 0.01 * torch.randn(32, 64)  # global RNG: must be restored too
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), Y[idx]).backward()
        opt.step()


def summary(model, opt):
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "decisions": [(d.cf, d.theta_min, d.send, tuple(sorted((d.layer_cf or {}).items())),
                           d.codec) for d in opt.decisions]}


def expect_error(kind, fn):
    try:
        fn()
    except kind as e:
        return str(e)
    raise AssertionError(f"expected {kind.__name__}")


results = {}
if MODE == "whole":
    for name in CONFIGS:
        model, opt = build(name)
        train(model, opt, 0, STEPS)
        results[name] = summary(model, opt)
elif MODE == "first":
    for name in CONFIGS:
        model, opt = build(name)
        train(model, opt, 0, SPLIT)
        checkpoint.save(DIRECTORY / f"{name}.pt", model, opt, step=SPLIT)
elif MODE == "resume":
    for name in CONFIGS:
        model, opt = build(name)
        extra = checkpoint.load(DIRECTORY / f"{name}.pt", model, opt)
        train(model, opt, extra["step"], STEPS)
        results[name] = summary(model, opt)
    model, opt = build("dgc_static")
    results["wrong_compressor"] = expect_error(
        ValueError, lambda: checkpoint.load(DIRECTORY / "topk_static.pt", model, opt))
    results["missing"] = expect_error(
        FileNotFoundError, lambda: checkpoint.load(DIRECTORY / "nothing.pt", model, opt))
elif MODE == "convert":
    model, opt = build("topk_gravac")
    results["wrong_size"] = expect_error(
        ValueError, lambda: checkpoint.load(DIRECTORY / "topk_gravac.pt", model, opt))
    extra = checkpoint.load(DIRECTORY / "topk_gravac.pt", model, opt, convert=True)
    results["converted_step"] = opt.step_count
    results["residuals_after_convert"] = len(opt.memory.residuals)
    train(model, opt, extra["step"], STEPS)
    results["after"] = summary(model, opt)
else:
    raise ValueError(f"unknown mode {MODE!r}")
report(RANK, **results)

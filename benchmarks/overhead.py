"""Wrapper overhead and per-compressor wire bytes/step time, on ResNet-101-shaped gradients.

Run by itself it launches the measurement as 2-rank Horovod jobs — once with Horovod's tensor
fusion on (default threshold) and once with it off (HOROVOD_FUSION_THRESHOLD=0) — and prints:
  * step time of ``horovod_gravac.DistributedOptimizer(compression="none")`` against
    ``hvd.DistributedOptimizer``, interleaved in the same job (ratio of medians);
  * per compressor: bytes on the wire per step and step time;
  * the effect of fusing the 314 layers' payloads into few collectives (fusion on/off), and
    TopK's per-layer allgathers (fused by Horovod as they come) against all layers as one
    grouped allgather per step (``groups=1``: one fused collective, started at the end of
    backward);

The model has ResNet-101's 314 parameter tensors (42.5M); its backward is a cheap
``Σ p·c`` so that the time measured is the exchange, not the convolutions.

    python -m benchmarks.overhead --np 2 --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_COMPRESSORS = "none,fp16,topk:100,dgc:100,randomk:100,qsgd,signsgd,powersgd:1"


def worker(args: argparse.Namespace) -> None:
    import horovod.torch as hvd
    import torch

    import horovod_gravac as hg
    from horovod_gravac.app.models import parameter_shapes

    hvd.init()
    torch.set_num_threads(1)
    shapes = parameter_shapes(args.model)
    names = [n for n, _ in shapes]
    gen = torch.Generator().manual_seed(hvd.rank())
    coeffs = [torch.randn(s, generator=gen) * 1e-2 for _, s in shapes]

    def make(kind: str, agent=None, **kw):
        """A fresh parameter set (hooks of one optimizer never see another's backward)."""
        params = [torch.nn.Parameter(torch.zeros(s)) for _, s in shapes]
        opt = torch.optim.SGD(params, lr=1e-3)
        if kind == "horovod":
            return hvd.DistributedOptimizer(opt, named_parameters=zip(names, params)), params
        return hg.DistributedOptimizer(opt, named_parameters=zip(names, params),
                                       compression=kind, agent=agent, **kw), params

    def step(opt, params) -> float:
        start = time.perf_counter()
        opt.zero_grad()
        sum((p * c).sum() for p, c in zip(params, coeffs)).backward()
        opt.step()
        return time.perf_counter() - start

    def interleaved(runs: dict) -> dict[str, float]:
        """Median step time of each run, alternating runs so machine noise hits all alike."""
        times = {k: [] for k in runs}
        for i in range(args.steps + 1):  # step 0 is a warm-up
            for kind, (opt, params) in runs.items():
                t = step(opt, params)
                if i:
                    times[kind].append(t)
        return {k: statistics.median(v) for k, v in times.items()}

    results: dict = {"model": args.model, "np": hvd.size(),
                     "fusion_threshold": os.environ.get("HOROVOD_FUSION_THRESHOLD", "default")}
    medians = interleaved({"horovod": make("horovod"), "ours": make("none")})
    results["horovod_s"], results["ours_none_s"] = medians["horovod"], medians["ours"]
    results["overhead_ratio"] = results["ours_none_s"] / results["horovod_s"]
    per = {}
    for spec in args.compressors.split(","):
        opt, params = make(spec)
        ts = [step(opt, params) for _ in range(args.steps + 1)][1:]
        per[spec] = {"step_s": statistics.median(ts), "bytes_per_step": opt.communication.last_bytes,
                     "dense_bytes_per_step": opt.communication.last_dense_bytes}
        del opt, params
    results["compressors"] = per
    medians = interleaved({"per_layer": make("topk:100"), "one_group": make("topk:100", groups=1)})
    results["topk100_per_layer_s"], results["topk100_one_group_s"] = \
        medians["per_layer"], medians["one_group"]
    # GraVAC's own cost: the same CF on the wire as static TopK 100x (it sends θmin = 100 in
    # its warm-up window; a tiny ε keeps it from the dense branch, which these random
    # gradients' low gain would otherwise take), plus the second level at 200x, the norms,
    # the stats allreduce and the decision broadcast; per gain definition (the fresh gain
    # compresses g once more), and the fresh gain measured every 4th step.
    gravacs = {f"gravac_{gain}": {"gain": gain} for gain in hg.agents.GAINS}
    gravacs["gravac_fresh_every4"] = {"gain": "fresh", "gain_interval": 4}
    gravacs_made = {name: make("topk", hg.agents.GraVAC(theta_min=100, theta_max=1000,
                                                       window=10**9, epsilon=1e-9, **kw))
                    for name, kw in gravacs.items()}
    medians = interleaved({"static": make("topk", hg.agents.Static(cf=100)), **gravacs_made})
    results["static_topk100_s"] = medians.pop("static")
    results["gravac_topk100_s"] = medians
    results["gravac_overhead"] = {k: v / results["static_topk100_s"] for k, v in medians.items()}
    sent = {name: sorted({d.sent_cf for d in opt.decisions})
            for name, (opt, _) in gravacs_made.items()}
    if any(cfs != [100] for cfs in sent.values()):
        raise RuntimeError(f"GraVAC did not send CF 100 throughout: {sent}")
    if hvd.rank() == 0:
        Path(args.json).write_text(json.dumps(results, indent=1))


def launch(args: argparse.Namespace, fusion: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if fusion is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = fusion
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(args.np),
               "-H", f"localhost:{args.np}", "--gloo", sys.executable, "-m", "benchmarks.overhead",
               "--worker", "--json", out.name, "--model", args.model, "--steps", str(args.steps),
               "--compressors", args.compressors]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(Path(out.name).read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--model", default="resnet101")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--compressors", default=DEFAULT_COMPRESSORS)
    parser.add_argument("--out", type=Path, default=Path("results/overhead"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    from horovod_gravac import compression as C
    for spec in args.compressors.split(","):
        C.create(spec)
    if args.np < 2 or args.steps < 1:
        raise ValueError("--np must be >= 2 and --steps >= 1")
    fused, unfused = launch(args, None), launch(args, "0")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps({"fused": fused, "unfused": unfused}, indent=1))
    lines = [f"{args.np} ranks, {args.model}-shaped gradients, median of {args.steps} steps",
             f"wrapper overhead (none vs hvd.DistributedOptimizer, fusion on): "
             f"{fused['ours_none_s']:.3f} s vs {fused['horovod_s']:.3f} s = {fused['overhead_ratio']:.3f}x",
             f"  (fusion off: {unfused['ours_none_s']:.3f} s vs {unfused['horovod_s']:.3f} s = "
             f"{unfused['overhead_ratio']:.3f}x)",
             f"GraVAC vs static TopK at the same CF sent (100x, {fused['static_topk100_s']:.3f} s), "
             "fusion on: " + ", ".join(f"{k[len('gravac_'):]} {v:.3f} s = "
                                       f"{fused['gravac_overhead'][k]:.3f}x"
                                       for k, v in fused["gravac_topk100_s"].items()),
             f"TopK 100x, per-layer allgathers vs one grouped allgather per step (groups=1): "
             f"fusion on {fused['topk100_per_layer_s']:.3f} s vs {fused['topk100_one_group_s']:.3f} s, "
             f"fusion off {unfused['topk100_per_layer_s']:.3f} s vs "
             f"{unfused['topk100_one_group_s']:.3f} s", "",
             "| compressor | MB/step on the wire | × fewer than dense | step s (fusion on) | "
             "step s (fusion off) | fusion speed-up |", "|---|---|---|---|---|---|"]
    for spec, r in fused["compressors"].items():
        off = unfused["compressors"][spec]["step_s"]
        lines.append(f"| {spec} | {r['bytes_per_step'] / 1e6:.2f} | "
                     f"{r['dense_bytes_per_step'] / max(1, r['bytes_per_step']):.1f} | "
                     f"{r['step_s']:.3f} | {off:.3f} | {off / r['step_s']:.2f} |")
    text = "\n".join(lines)
    (args.out / "overhead.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""Wrapper overhead and per-compressor wire bytes/step time, on ResNet-101-shaped gradients.

Run by itself it launches the measurement as one 2-rank Horovod job (Horovod's tensor fusion
on, its default threshold) and prints, each side by side in the same job (interleaved steps,
ratio of medians):
  * step time of ``horovod_gravac.DistributedOptimizer(compression="none")`` against
    ``hvd.DistributedOptimizer``, at three bucket sizes (``bucket_cap_mb``);
  * per compressor: bytes on the wire per step and step time; TopK 100x at the three bucket
    sizes;
  * GraVAC against static TopK at the same CF sent (100x throughout): the cost of measuring
    gains (sampled, exact, per gain definition, every 4th step) and of the agent.

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
#: bucket sizes (gradient MB per fused collective) compared
BUCKET_CAPS = (1.0, 25.0, 100.0)


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

    results: dict = {"model": args.model, "np": hvd.size(), "bucket_caps_mb": BUCKET_CAPS}
    medians = interleaved({"horovod": make("horovod"),
                           **{f"ours_{cap:g}": make("none", bucket_cap_mb=cap)
                              for cap in BUCKET_CAPS}})
    results["horovod_s"] = medians.pop("horovod")
    results["ours_none_s"] = medians
    results["overhead_ratio"] = {k: v / results["horovod_s"] for k, v in medians.items()}
    per = {}
    for spec in args.compressors.split(","):
        opt, params = make(spec)
        ts = [step(opt, params) for _ in range(args.steps + 1)][1:]
        per[spec] = {"step_s": statistics.median(ts), "bytes_per_step": opt.communication.last_bytes,
                     "dense_bytes_per_step": opt.communication.last_dense_bytes}
        del opt, params
    results["compressors"] = per
    results["topk100_by_bucket_s"] = interleaved(
        {f"{cap:g}": make("topk:100", bucket_cap_mb=cap) for cap in BUCKET_CAPS})
    # GraVAC's own cost: the same CF on the wire as static TopK 100x (θmin = θmax = 100; a
    # tiny ε keeps it from the dense branch, which these random gradients' low gain would
    # otherwise take), plus measuring the gains (sampled by default, exactly by multi-level
    # compression with gain_sample=None) and the agent (statistics riding in the last
    # bucket, the decision broadcast). Window 50: the cost model measures every 5th step
    gravacs = {"cost_model": {}, "cost_model_every_step": {"gain_interval": 1},
               "cost_model_exact": {"gain_sample": None},
               **{f"throughput_{gain}": {"search": "throughput", "gain": gain}
                  for gain in hg.agents.GAINS}}
    gravacs_made = {name: make("topk", hg.agents.GraVAC(theta_min=100, theta_max=100,
                                                       window=50, epsilon=1e-9, **kw))
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


def launch(args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
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
    r = launch(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(r, indent=1))
    lines = [f"{args.np} ranks, {args.model}-shaped gradients, median of {args.steps} steps, "
             "Horovod's fusion on",
             f"wrapper overhead (none vs hvd.DistributedOptimizer, {r['horovod_s']:.3f} s): " +
             ", ".join(f"bucket {k[len('ours_'):]} MB {v:.3f} s = "
                       f"{r['overhead_ratio'][k]:.3f}x" for k, v in r["ours_none_s"].items()),
             "TopK 100x by bucket size: " + ", ".join(
                 f"{k} MB {v:.3f} s" for k, v in r["topk100_by_bucket_s"].items()),
             f"GraVAC vs static TopK at the same CF sent (100x, {r['static_topk100_s']:.3f} s): " +
             ", ".join(f"{k} {v:.3f} s = {r['gravac_overhead'][k]:.3f}x"
                       for k, v in r["gravac_topk100_s"].items()), "",
             "| compressor | MB/step on the wire | × fewer than dense | step s |",
             "|---|---|---|---|"]
    for spec, c in r["compressors"].items():
        lines.append(f"| {spec} | {c['bytes_per_step'] / 1e6:.2f} | "
                     f"{c['dense_bytes_per_step'] / max(1, c['bytes_per_step']):.1f} | "
                     f"{c['step_s']:.3f} |")
    text = "\n".join(lines)
    (args.out / "overhead.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

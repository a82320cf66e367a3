"""End-to-end comparison on an emulated network: time-to-target, quality, bytes, mean CF.

Every configuration trains the same workload for the same number of steps, one job at a
time, through ``launch/netem.py`` (each rank behind its own shaped link; needs root) or, with
``--no-emulation``, on the unshaped local machine. Baselines run in the same benchmark: dense
Horovod and Horovod fp16 (``hvd.DistributedOptimizer``), static TopK and DGC at a low and a
high CF, Accordion, GraVAC with the exponential and the geometric policy, and PyTorch DDP with
its PowerSGD hook as the outside baseline. Workloads: the PTB LSTM (``--workload ptb``, target
validation perplexity) and a CNN on scikit-learn's digits (``--workload digits``, target
accuracy; CIFAR needs a download this machine cannot do).

    sudo .venv/bin/python -m benchmarks.end_to_end --rate 1gbit --steps 200 --target 1000
    sudo .venv/bin/python -m benchmarks.end_to_end --workload digits --rate 100mbit --target 0.9
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def configurations(low: float, high: float, window: int) -> dict[str, list[str]]:
    gravac = ["--compression", "topk", "--agent", "gravac", "--theta-min", str(low),
              "--theta-max", str(high), "--epsilon", "0.5", "--window", str(window)]
    return {
        "dense (Horovod)": ["--baseline", "horovod"],
        "fp16 (Horovod)": ["--baseline", "horovod-fp16"],
        f"TopK {low:g}x": ["--compression", "topk", "--agent", "static", "--cf", str(low)],
        f"TopK {high:g}x": ["--compression", "topk", "--agent", "static", "--cf", str(high)],
        f"DGC {low:g}x": ["--compression", "dgc", "--memory", "residual", "--agent", "static",
                          "--cf", str(low)],
        f"DGC {high:g}x": ["--compression", "dgc", "--memory", "residual", "--agent", "static",
                           "--cf", str(high)],
        "Accordion (TopK 1.01x/10x)": ["--compression", "topk", "--agent", "accordion",
                                       "--low-cf", "1.01", "--high-cf", "10", "--interval",
                                       str(window), "--interval-unit", "steps"],
        "GraVAC exponential": gravac + ["--policy", "exponential"],
        "GraVAC geometric": gravac + ["--policy", "geometric"],
        "DDP + PowerSGD (rank 1)": ["--baseline", "ddp-powersgd", "--powersgd-rank", "1"],
    }


WORKLOADS = {  # --workload → (gravac-train flags, target metric)
    "ptb": (["--data", "ptb", "--lr", "1", "--momentum", "0", "--clip", "0.25"], "perplexity"),
    "digits": (["--data", "digits", "--lr", "0.05", "--batch-size", "16"],
               "accuracy"),
}


def run_one(name: str, flags: list[str], args: argparse.Namespace, out: Path) -> dict:
    flags_of_workload, metric = WORKLOADS[args.workload]
    workload = ["--model", args.model, *flags_of_workload, "--steps", str(args.steps),
                "--eval-interval", str(args.eval_interval), "--eval-batches", str(args.eval_batches),
                "--target-metric", metric, "--target", str(args.target),
                "--no-progress", "--out", str(out)]
    train = [sys.executable, "-m", "benchmarks.train", *workload, *flags]
    if args.no_emulation:
        cmd = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(args.np), "-H",
               f"localhost:{args.np}", "--gloo", *train]
    else:
        cmd = [sys.executable, str(ROOT / "launch" / "netem.py"), "--np", str(args.np),
               "--rate", args.rate, "--delay", args.delay, "--", *train]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"config": name, "time_to_target_s": s["time_to_target_s"], "wall_s": s["wall_s"],
            "final_quality": s["final"][metric], "MB_sent": s["total_bytes"] / 1e6,
            "mean_cf": s["mean_cf"], "steps": s["steps"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--workload", default="ptb", choices=sorted(WORKLOADS))
    p.add_argument("--model", default=None, help="PTB: lstm200 (default), lstm650, lstm1500")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--target", type=float, default=None,
                   help="validation perplexity (ptb, default 1000) or accuracy (digits, 0.9)")
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--delay", default="1ms")
    p.add_argument("--low-cf", type=float, default=10.0)
    p.add_argument("--high-cf", type=float, default=1000.0)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--no-emulation", action="store_true")
    p.add_argument("--out", type=Path, default=Path("results/end_to_end"))
    args = p.parse_args(argv)
    if args.workload == "digits":
        args.model = args.model or "cnn_digits"
        args.target = 0.9 if args.target is None else args.target
    else:
        args.model = args.model or "lstm200"
        args.target = 1000.0 if args.target is None else args.target
    if not args.no_emulation and os.geteuid() != 0:
        raise SystemExit("network emulation needs root: run as root, or pass --no-emulation")
    configs = configurations(args.low_cf, args.high_cf, args.window)
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in configs]
        if unknown:
            raise ValueError(f"unknown configurations {unknown}; valid: {list(configs)}")
        configs = {k: v for k, v in configs.items() if k in wanted}
    from tqdm import tqdm

    rows, runs = [], args.out / "runs"
    for name, flags in tqdm(configs.items(), desc="end-to-end"):
        slug = name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("/", "-")
        rows.append(run_one(name, flags, args, runs / slug))
    dense = rows[0]
    metric = WORKLOADS[args.workload][1]
    lines = [f"{args.np} ranks, {args.model} on {args.workload}, {args.steps} steps, link "
             f"{'unshaped' if args.no_emulation else f'{args.rate} {args.delay}'}, "
             f"target {metric} {args.target:g}", "",
             f"| configuration | time to target (s) | speed-up vs dense | final {metric} | "
             "MB sent/rank | × fewer bytes | mean CF | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttt = r["time_to_target_s"]
        speed = (dense["time_to_target_s"] / ttt) if ttt and dense["time_to_target_s"] else None
        lines.append(f"| {r['config']} | {ttt:.1f} | {speed:.2f} | " if ttt else f"| {r['config']} | not reached | — | ")
        lines[-1] += (f"{r['final_quality']:.4g} | {r['MB_sent']:.1f} | "
                      f"{dense['MB_sent'] / max(r['MB_sent'], 1e-9):.1f} | {r['mean_cf']:.1f} | "
                      f"{r['wall_s']:.1f} |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "end_to_end.md").write_text(table + "\n")
    with open(args.out / "end_to_end.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from benchmarks.plot import plot_runs, read_run
    plot_runs([read_run(d) for d in sorted(runs.iterdir())], args.out / "plots", metric)
    print(table)


if __name__ == "__main__":
    main()

"""End-to-end comparison on an emulated network: time-to-target, quality, bytes, mean CF.

The regime the paper targets: several workers behind links where dense communication costs
several times the compute of a step. Each configuration runs as its own job, one at a time,
and its result is kept on disk; every finished job re-merges all finished results into one
table, so the benchmark can be built over several (background) runs and a stopped run loses
at most the job in flight. Configurations: dense Horovod and Horovod fp16
(``hvd.DistributedOptimizer``), static TopK at CF 10/100/1000 and DGC at 10/100, this
library's PowerSGD at rank 1 and 4, Accordion (TopK, the paper's 1.01x/10x pair), GraVAC at
its defaults (the cost-model search) on TopK and on PowerSGD, GraVAC with the paper's search
(exponential and geometric policy, the library's other defaults), GraVAC with the other two
gain definitions (error-fed, the authors' code), GraVAC with the paper's parameters (its
search, error-fed gain measured exactly, one 1% tolerance, EWMA N/100, no settling, no
reopening, every tensor compressed), GraVAC's and Accordion's PowerSGD rank, static TopK and
GraVAC under the error-budgeted layer plan (``--layer-plan``), PyTorch DDP with its PowerSGD hook, and TopK, PowerSGD and GraVAC-PowerSGD
through DDP with this library's hook.

How time to target is measured (the table says which, per configuration):

* **on the link** — adaptive configurations (GraVAC, Accordion), whose decisions depend on
  measured time: trained through ``launch/netem.py`` (every rank behind its own shaped link),
  time to target = training time (evaluation excluded) at the first evaluation that reaches
  the target.
* **steps × step time** — configurations whose numerics do not depend on time: trained
  unshaped for the quality curve; time to target = the steps to reach the target × the
  median step time of a short run (``--timing-steps``) on the shaped link. With
  ``--all-on-link`` they are trained and timed on the link like the adaptive ones, so every
  row is measured the same way (on PTB the two methods' median steps of the same static
  configuration differed by up to 8%, either way).

The target, unless given, follows one rule for every workload: dense's validation metric at
75% of the run (mean over its seeds), so dense reaches it inside the run. The GraVAC window
is a tenth of the run (gravac-train's default), Accordion's interval the same.

    sudo .venv/bin/python -m benchmarks.end_to_end --workload ptb --np 4 --rate 100mbit
    sudo .venv/bin/python -m benchmarks.end_to_end --workload digits --np 4 --rate 100mbit
    sudo .venv/bin/python -m benchmarks.end_to_end --workload gpt --np 4 --rate 100mbit
    .venv/bin/python -m benchmarks.end_to_end --workload ptb --merge-only   # table only
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from horovod_gravac.app.train import auto_window

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    flags: tuple[str, ...]
    adaptive: bool = False  # decisions depend on measured time: train on the shaped link


def configurations(steps: int, ranks: int, workload: str = "ptb") -> dict[str, Config]:
    """Every configuration; on the AdamW workload (``gpt``) the compressed ones run the
    Adam-family exchange (gravac-train's default there), with the gradient exchange of
    earlier releases as a control, and PyTorch's PowerSGD hook starts after its documented
    warm-up (``start_powerSGD_iter``: 10% of the run)."""
    window = str(auto_window(steps))  # Accordion's interval: gravac-train's GraVAC window
    topk = ("--compression", "topk", "--agent", "static", "--cf")
    dgc = ("--compression", "dgc", "--memory", "residual", "--agent", "static", "--cf")
    gravac = ("--compression", "topk", "--agent", "gravac", "--theta-min", "10",
              "--theta-max", "1000")
    paper_search = (*gravac, "--search", "throughput")  # the paper's window per candidate
    if workload == "gpt":
        hook = ("--baseline", "ddp-powersgd", "--powersgd-rank", "1",
                "--powersgd-start", str(max(2, steps // 10)))
        return {
            "dense (Horovod)": Config(("--baseline", "horovod")),
            "DDP + PowerSGD (rank 1)": Config(hook),
            "PowerSGD rank 1": Config(("--compression", "powersgd:1")),
            "TopK 100x": Config((*topk, "100")),
            "GraVAC defaults (PowerSGD)": Config(("--compression", "powersgd", "--agent",
                                                  "gravac"), adaptive=True),
            "GraVAC defaults (TopK)": Config(("--compression", "topk", "--agent", "gravac"),
                                             adaptive=True),
            "PowerSGD rank 1 (gradients)": Config(("--compression", "powersgd:1",
                                                  "--adam-exchange", "off")),
            "GraVAC defaults (PowerSGD, DDP hook)": Config(
                ("--compression", "powersgd", "--agent", "gravac", "--ddp"), adaptive=True),
            # the codec choice: dense until Adam's variance is frozen, then the choice
            "CodecChoice auto": Config(("--compression", "auto", "--agent", "choice"),
                                       adaptive=True),
        }
    return {
        "dense (Horovod)": Config(("--baseline", "horovod")),
        "fp16 (Horovod)": Config(("--baseline", "horovod-fp16")),
        "TopK 10x": Config((*topk, "10")),
        "TopK 100x": Config((*topk, "100")),
        "TopK 1000x": Config((*topk, "1000")),
        "DGC 10x": Config((*dgc, "10")),
        "DGC 100x": Config((*dgc, "100")),
        "PowerSGD rank 1": Config(("--compression", "powersgd:1")),
        "PowerSGD rank 4": Config(("--compression", "powersgd:4")),
        "Accordion (TopK 1.01x/10x)": Config(
            ("--compression", "topk", "--agent", "accordion", "--low-cf", "1.01", "--high-cf",
             "10", "--interval", window, "--interval-unit", "steps"), adaptive=True),
        # GraVAC with every parameter at its default, on either compressor
        "GraVAC defaults (TopK)": Config(("--compression", "topk", "--agent", "gravac"),
                                         adaptive=True),
        "GraVAC defaults (PowerSGD)": Config(("--compression", "powersgd", "--agent", "gravac"),
                                             adaptive=True),
        # the paper's search (a window per candidate) with the library's other defaults
        "GraVAC exponential": Config((*paper_search, "--policy", "exponential"), adaptive=True),
        "GraVAC geometric": Config((*paper_search, "--policy", "geometric"), adaptive=True),
        # the gain definitions side by side, everything else at defaults
        "GraVAC exponential, error-fed gain": Config(
            (*paper_search, "--policy", "exponential", "--gain", "error_fed"), adaptive=True),
        "GraVAC exponential, authors' gain": Config(
            (*paper_search, "--policy", "exponential", "--gain", "authors"), adaptive=True),
        "GraVAC (paper's parameters)": Config(
            (*paper_search, "--policy", "exponential", "--gain", "error_fed", "--omega", "0.01",
             "--omega-throughput", "0.01", "--settle-steps", "0", "--epsilon", "0.7",
             "--ewma", str(ranks / 100), "--reopen-tolerance", "0", "--reopen-lr-ratio", "0",
             "--min-compress-numel", "0", "--gain-sample", "0"),
            adaptive=True),
        # beyond the paper: the agents drive PowerSGD's rank through the CF (r = nm/(CF(n+m));
        # on the LSTM's 800x200 weights CF 40 is rank 4, CF 160 rank 1: Accordion's pair)
        "GraVAC PowerSGD (CF -> rank)": Config(
            ("--compression", "powersgd", "--agent", "gravac", "--theta-min", "10",
             "--theta-max", "1000", "--policy", "exponential", "--search", "throughput"),
            adaptive=True),
        # an error-budgeted CF per tensor under the agent's uniform CF (agents.LayerPlan)
        "TopK 100x + layer plan": Config((*topk, "100", "--layer-plan")),
        "GraVAC defaults (TopK) + layer plan": Config(
            ("--compression", "topk", "--agent", "gravac", "--layer-plan"), adaptive=True),
        "GraVAC defaults (PowerSGD) + layer plan": Config(
            ("--compression", "powersgd", "--agent", "gravac", "--layer-plan"), adaptive=True),
        "Accordion PowerSGD (CF 40/160)": Config(
            ("--compression", "powersgd", "--agent", "accordion", "--low-cf", "40", "--high-cf",
             "160", "--interval", window, "--interval-unit", "steps"), adaptive=True),
        "DDP + PowerSGD (rank 1)": Config(("--baseline", "ddp-powersgd", "--powersgd-rank", "1")),
        # the same compression through PyTorch DDP and this library's hook (horovod_gravac.ddp)
        "TopK 100x (DDP hook)": Config((*topk, "100", "--ddp")),
        "PowerSGD rank 1 (DDP hook)": Config(("--compression", "powersgd:1", "--ddp")),
        "GraVAC defaults (PowerSGD, DDP hook)": Config(
            ("--compression", "powersgd", "--agent", "gravac", "--ddp"), adaptive=True),
        # the codec among dense, fp16, PowerSGD ranks 1/4, TopK 100x/1000x (agents.CodecChoice)
        "CodecChoice auto": Config(("--compression", "auto", "--agent", "choice"),
                                   adaptive=True),
        # and a codec per tensor under it, within the error of its codec (agents.LayerPlan)
        "CodecChoice auto + layer plan": Config(
            ("--compression", "auto", "--agent", "choice", "--layer-plan"), adaptive=True),
    }


WORKLOADS = {  # --workload → (gravac-train flags, target metric, default steps)
    "ptb": (("--model", "lstm200", "--data", "ptb", "--lr", "1", "--momentum", "0",
             "--clip", "0.25"), "perplexity", 200),
    "digits": (("--model", "cnn_digits", "--data", "digits", "--lr", "0.05",
                "--batch-size", "16"), "accuracy", 150),
    # the Transformer: AdamW (eps 1e-6), a linear warm-up over 20 steps, then a cosine to 0;
    # 250 steps, long enough to leave the unigram plateau (perplexity ≈ 700)
    "gpt": (("--model", "gpt4x256", "--data", "ptb", "--optimizer", "adamw", "--lr", "1e-3",
             "--weight-decay", "0.01", "--adam-eps", "1e-6", "--warmup-steps", "20",
             "--lr-schedule", "cosine"), "perplexity", 250),
}
TIMING_WARMUP = 3  # first steps of a timing run left out of its median


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def launch(train_flags: list[str], args: argparse.Namespace, shaped: bool) -> None:
    train = [sys.executable, "-m", "horovod_gravac.app.train", *train_flags]
    if shaped:
        cmd = [sys.executable, str(ROOT / "launch" / "netem.py"), "--np", str(args.np),
               "--rate", args.rate, "--delay", args.delay, "--", *train]
    else:
        cmd = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(args.np), "-H",
               f"localhost:{args.np}", "--gloo", *train]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


def trained_on_link(config: Config, args: argparse.Namespace) -> bool:
    """Whether the configuration's quality run is the timed one, through the shaped links."""
    return not args.no_emulation and (config.adaptive or args.all_on_link)


def run_config(name: str, config: Config, seed: int, args: argparse.Namespace,
               timed: bool) -> None:
    """The jobs of one configuration and seed whose results are not on disk yet: the
    untimed ones (unshaped quality runs) or the timed ones (everything on the link)."""
    base, metric, _ = WORKLOADS[args.workload]
    common = [*base, *config.flags, "--no-progress", "--eval-batches", str(args.eval_batches)]
    emulate = not args.no_emulation
    run_dir = args.out / "runs" / slug(name) / f"seed{seed}"
    on_link = trained_on_link(config, args)
    if timed == (on_link or not emulate) and not (run_dir / "summary.json").is_file():
        launch([*common, "--steps", str(args.steps), "--eval-interval", str(args.eval_interval),
                "--seed", str(seed), "--out", str(run_dir)], args, shaped=on_link)
    timing_dir = args.out / "runs" / slug(name) / "timing"
    if timed and emulate and not on_link and not (timing_dir / "summary.json").is_file():
        launch([*common, "--steps", str(args.timing_steps), "--eval-interval",
                str(10 * args.timing_steps), "--out", str(timing_dir)], args, shaped=True)


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def median_step_s(run_dir: Path) -> float:
    times = [float(r["step_s"]) for r in _rows(run_dir / "steps.csv")]
    return statistics.median(times[TIMING_WARMUP:] or times)


def metric_curve(run_dir: Path, metric: str) -> list[tuple[int, float, float]]:
    """(step, training seconds, value) of each evaluation."""
    return [(int(r["step"]), float(r["train_s"]), float(r["value"]))
            for r in _rows(run_dir / "evals.csv") if r["metric"] == metric]


def better(metric: str, value: float, target: float) -> bool:
    return value <= target if metric == "perplexity" else value >= target


def merge(args: argparse.Namespace) -> list[dict]:
    """One row per configuration with finished runs; writes CSV, Markdown and plots."""
    _, metric, _ = WORKLOADS[args.workload]
    configs = configurations(args.steps, args.np, args.workload)
    runs = args.out / "runs"
    finished = {name: sorted((runs / slug(name)).glob("seed*/summary.json"))
                for name in configs}
    dense_runs = [p.parent for p in finished["dense (Horovod)"]]
    target = args.target
    if target is None and dense_runs:  # dense's metric at 75% of the run
        at = 0.75 * args.steps
        target = statistics.mean(min(metric_curve(d, metric), key=lambda e: abs(e[0] - at))[2]
                                 for d in dense_runs)
    rows = []
    for name, summaries in finished.items():
        config = configs[name]
        # static configurations on the link: their step time comes from a separate timing run
        timing = runs / slug(name) / "timing" \
            if not trained_on_link(config, args) and not args.no_emulation else None
        if not summaries or (timing and not (timing / "steps.csv").is_file()):
            continue
        times, steps_to, finals, sent, cfs = [], [], [], [], []
        for path in summaries:
            s = json.loads(path.read_text())
            curve = metric_curve(path.parent, metric)
            hit = next((e for e in curve if target is not None and better(metric, e[2], target)),
                       None)
            if timing is None:
                times.append(hit[1] if hit else None)
            else:
                times.append(hit[0] * median_step_s(timing) if hit else None)
            steps_to.append(hit[0] if hit else None)
            finals.append(curve[-1][2])
            sent.append(s["total_bytes"] / 1e6)
            cfs.append(s["mean_cf"])
        reached = [t for t in times if t is not None]
        rows.append({
            "config": name,
            "timed": "on the link" if trained_on_link(config, args) else
                     ("unshaped" if args.no_emulation else "steps x step time"),
            "seeds": len(summaries), "reached": len(reached),
            "time_to_target_s": statistics.mean(reached) if len(reached) == len(times) else None,
            "steps_to_target": statistics.mean(s for s in steps_to if s) if reached else None,
            "step_s": median_step_s(timing or summaries[0].parent),
            "final": statistics.mean(finals), "MB_sent": statistics.mean(sent),
            "mean_cf": statistics.mean(cfs)})
    write_tables(rows, target, metric, args)
    return rows


def write_tables(rows: list[dict], target: float | None, metric: str,
                 args: argparse.Namespace) -> None:
    by = {r["config"]: r for r in rows}
    dense, topk10 = by.get("dense (Horovod)"), by.get("TopK 10x")
    # the static CFs GraVAC chooses among: TopK and DGC at a fixed CF
    statics = [r for r in rows if r["time_to_target_s"] and r["config"].startswith(("TopK", "DGC"))]
    best = min(statics, key=lambda r: r["time_to_target_s"]) if statics else None
    # and the best fixed setting of any kind (any compressor, any CF, PyTorch's hook)
    fixed = configurations(args.steps, args.np, args.workload)
    any_static = [r for r in rows if r["time_to_target_s"] and r["config"] in fixed
                  and not fixed[r["config"]].adaptive]
    best_any = min(any_static, key=lambda r: r["time_to_target_s"]) if any_static else None

    def ratio(ref: dict | None, r: dict) -> str:
        if not ref or not ref["time_to_target_s"] or not r["time_to_target_s"]:
            return "—"
        return f"{ref['time_to_target_s'] / r['time_to_target_s']:.2f}"

    link = "unshaped" if args.no_emulation else f"{args.rate} links (tbf)"
    lines = [f"{args.np} ranks, {args.workload} ({WORKLOADS[args.workload][0][1]}), "
             f"{args.steps} steps, {link}, target {metric} "
             f"{'—' if target is None else f'{target:.4g}'}"]
    if dense and not args.no_emulation and not args.all_on_link:  # seed 0 ran unshaped
        unshaped = median_step_s(args.out / "runs" / slug("dense (Horovod)") / "seed0")
        lines.append(f"dense step: {dense['step_s']:.3f} s on the link vs {unshaped:.3f} s "
                     f"unshaped: communication ≈ {dense['step_s'] / unshaped - 1:.1f}× compute")
    if best:
        lines.append(f"best static CF in hindsight (TopK/DGC): {best['config']}")
    if best_any:
        lines.append(f"best static configuration in hindsight (any): {best_any['config']}")
    lines += ["", f"| configuration | timed | seeds reached | time to target (s) | vs dense | "
              f"vs TopK 10x | vs best static CF | vs best static (any) | final {metric} | "
              "median step (s) | MB sent/rank | × fewer bytes | mean CF |", "|---" * 13 + "|"]
    for r in rows:
        ttt = r["time_to_target_s"]
        fewer = f"{dense['MB_sent'] / max(r['MB_sent'], 1e-9):.1f}" if dense else "—"
        lines.append(f"| {r['config']} | {r['timed']} | {r['reached']}/{r['seeds']} | "
                     f"{'not reached' if ttt is None else f'{ttt:.1f}'} | {ratio(dense, r)} | "
                     f"{ratio(topk10, r)} | {ratio(best, r)} | {ratio(best_any, r)} | "
                     f"{r['final']:.4g} | "
                     f"{r['step_s']:.3f} | {r['MB_sent']:.1f} | {fewer} | {r['mean_cf']:.1f} |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "end_to_end.md").write_text(table + "\n")
    with open(args.out / "end_to_end.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["config", "timed", "seeds", "reached",
                                               "time_to_target_s", "steps_to_target", "step_s",
                                               "final", "MB_sent", "mean_cf"])
        writer.writeheader()
        writer.writerows(rows)
    from horovod_gravac.app.plot import plot_runs, read_run
    seed0 = [args.out / "runs" / slug(r["config"]) / "seed0" for r in rows]
    seed0 = [d for d in seed0 if (d / "steps.csv").is_file()]
    if seed0:
        plot_runs([dict(read_run(d), name=d.parent.name) for d in seed0], args.out / "plots",
                  metric)
    print(table, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="ptb", choices=sorted(WORKLOADS))
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="ptb: 200, digits: 150, gpt: 250")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--target", type=float, default=None,
                   help="default: dense's metric at 75%% of the run")
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--timing-steps", type=int, default=30)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--delay", default="1ms")
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--no-emulation", action="store_true",
                   help="everything unshaped and timed as it runs (tests, quick looks)")
    p.add_argument("--all-on-link", action="store_true",
                   help="train every configuration through the shaped links and time it as it "
                        "runs, static ones too (the same method for every row)")
    p.add_argument("--merge-only", action="store_true", help="only merge finished results")
    p.add_argument("--out", type=Path, default=None, help="default: results/end_to_end/<workload>")
    args = p.parse_args(argv)
    args.steps = args.steps or WORKLOADS[args.workload][2]
    args.out = args.out or Path("results/end_to_end") / args.workload
    for flag, value in (("--np", args.np), ("--steps", args.steps),
                        ("--eval-interval", args.eval_interval),
                        ("--timing-steps", args.timing_steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    configs = configurations(args.steps, args.np, args.workload)
    wanted = args.only.split(",") if args.only else list(configs)
    unknown = [w for w in wanted if w not in configs]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; valid: {list(configs)}")
    if not args.merge_only:
        if not args.no_emulation and os.geteuid() != 0:
            raise SystemExit("network emulation needs root: run as root, or pass --no-emulation")
        # untimed jobs first, then every timed job back to back (nothing else should share
        # the machine then); dense first in each phase: it defines the target
        for timed in (False, True):
            for seed in seeds:
                for name in wanted:
                    print(f"[end_to_end] {args.workload} seed {seed}: {name}"
                          f"{' (timed)' if timed else ''}", flush=True)
                    run_config(name, configs[name], seed, args, timed)
                    merge(args)
    merge(args)


if __name__ == "__main__":
    main()

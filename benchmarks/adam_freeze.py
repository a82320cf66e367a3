"""What the Adam-family exchange should send once Adam's variance is frozen.

gpt4x256 on PTB with AdamW (the ``gpt`` workload of :mod:`benchmarks.end_to_end`: lr 1e-3,
eps 1e-6, weight decay 0.01, 20 warm-up steps, cosine), 2 ranks unshaped, 250 steps. Every
compressed row freezes the variance at the same step (``--adam-max-warmup``, 60 by default),
so the rows differ only in the compressor and in what each rank compresses after the freeze:
its preconditioned momentum (1-bit Adam's) or its preconditioned gradient (``--adam-sends``).
The lossless row (``--compression none --adam-exchange on``) is the cost of freezing itself.
Each row runs as its own job and is kept on disk; every finished job re-merges the table.

    .venv/bin/python -m benchmarks.adam_freeze               # results/adam/freeze_study
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from benchmarks.end_to_end import WORKLOADS, launch, slug

ROOT = Path(__file__).resolve().parent.parent


def configurations(freeze: int) -> dict[str, tuple[str, ...]]:
    """The rows: dense, the lossless frozen exchange, and three compressors × two sends."""
    frozen = ("--adam-max-warmup", str(freeze))
    rows = {"dense (Horovod)": ("--baseline", "horovod"),
            "lossless, frozen": ("--compression", "none", "--adam-exchange", "on", *frozen)}
    for label, spec in (("PowerSGD rank 1", "powersgd:1"), ("TopK 100x", "topk:100"),
                        ("1-bit two-stage", "onebit:exchange=two_stage")):
        for sends in ("momentum", "gradient"):
            rows[f"{label}, sends {sends}"] = ("--compression", spec, *frozen,
                                               "--adam-sends", sends)
    return rows


def summarize(run_dir: Path) -> dict:
    """Final perplexity, bytes and the frozen step of one finished run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "evals.csv") as f:
        perplexity = [float(r["value"]) for r in csv.DictReader(f) if r["metric"] == "perplexity"]
    with open(run_dir / "steps.csv") as f:
        frozen = next((int(r["step"]) for r in csv.DictReader(f) if r.get("phase") == "frozen"),
                      None)
    return {"perplexity": perplexity[-1], "mb_sent": summary["total_bytes"] / 1e6,
            "fewer_bytes": summary["dense_bytes"] / summary["total_bytes"],
            "first_frozen_step": frozen}


def write_table(rows: dict[str, dict], out: Path, np: int, steps: int, freeze: int) -> None:
    dense = rows.get("dense (Horovod)", {}).get("perplexity")
    fields = ["configuration", "first frozen step", "final perplexity", "vs dense",
              "MB sent", "× fewer bytes"]
    table = []
    for name, r in rows.items():
        ratio = f"{r['perplexity'] / dense:.3f}" if dense else "—"
        table.append([name, r["first_frozen_step"] or "—", f"{r['perplexity']:.1f}", ratio,
                      f"{r['mb_sent']:.1f}", f"{r['fewer_bytes']:.1f}"])
    with open(out / "adam_freeze.csv", "w", newline="") as f:
        csv.writer(f).writerows([fields, *table])
    lines = [f"{np} ranks unshaped, gpt4x256 on PTB (AdamW), {steps} steps, the variance frozen "
             f"at step {freeze}; perplexity on the validation set at the end", "",
             "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    (out / "adam_freeze.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--freeze", type=int, default=60, help="the step the variance freezes at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "adam" / "freeze_study")
    args = p.parse_args(argv)
    if not 1 <= args.freeze < args.steps:
        raise ValueError(f"--freeze must be in [1, --steps), got {args.freeze}")
    configs = configurations(args.freeze)
    names = args.only.split(",") if args.only else list(configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"--only: unknown configurations {unknown}; known: {list(configs)}")
    base = [*WORKLOADS["gpt"][0], "--steps", str(args.steps), "--eval-interval", "25",
            "--eval-batches", "20", "--seed", str(args.seed), "--no-progress"]
    launcher = argparse.Namespace(np=args.np)
    rows = {}
    for name in configs:
        run_dir = args.out / "runs" / slug(name)
        if name in names and not (run_dir / "summary.json").is_file():
            launch([*base, *configs[name], "--out", str(run_dir)], launcher, shaped=False)
        if (run_dir / "summary.json").is_file():
            rows[name] = summarize(run_dir)
            write_table(rows, args.out, args.np, args.steps, args.freeze)


if __name__ == "__main__":
    main()

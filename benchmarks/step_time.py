"""Step time side by side on the emulated link, with where each step's time goes.

Every configuration trains the same workload for ``--steps`` steps through ``launch/netem.py``
(every rank behind its own shaped link), in interleaved rounds (A B C … A B C …: the machine
is shared, and drift hits every configuration alike); the steps after ``--warmup`` of every
round are pooled and their median is the configuration's step time. Ratios are to DDP with
PyTorch's own PowerSGD hook, and GraVAC at a pinned CF to the static configuration that sends
the same CF (the cost of adapting). The phases of a step (medians, from ``steps.csv``):

* compute — forward + backward, less this library's work inside backward;
* begin — error feedback, compression, gain measurement, packing, starting collectives;
* wait — blocked on collectives (and on the agent's decision broadcast);
* finish — later rounds' compression, decoding, the finite verdict, the agent;
* optimizer — the wrapped optimizer's step.

    sudo .venv/bin/python -m benchmarks.step_time --np 4 --rate 100mbit --rounds 2
    .venv/bin/python -m benchmarks.step_time --np 4 --no-emulation   # unshaped (loopback)
    .venv/bin/python -m benchmarks.step_time --merge-only
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
from pathlib import Path

from benchmarks.end_to_end import WORKLOADS, launch, slug

#: name → (gravac-train flags, the static configuration it is the adaptive twin of)
CONFIGS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "DDP + PyTorch PowerSGD hook (rank 1)": (
        ("--baseline", "ddp-powersgd", "--powersgd-rank", "1"), None),
    "PowerSGD rank 1 (Horovod optimizer)": (("--compression", "powersgd:1"), None),
    "PowerSGD rank 1 (DDP hook)": (("--compression", "powersgd:1", "--ddp"), None),
    "TopK 100x (Horovod optimizer)": (("--compression", "topk", "--agent", "static",
                                       "--cf", "100"), None),
    "GraVAC pinned at CF 100 (TopK)": (
        ("--compression", "topk", "--agent", "gravac", "--theta-min", "100",
         "--theta-max", "100"), "TopK 100x (Horovod optimizer)"),
    "GraVAC pinned at CF 160 (PowerSGD rank 1)": (
        ("--compression", "powersgd", "--agent", "gravac", "--theta-min", "160",
         "--theta-max", "160"), "PowerSGD rank 1 (Horovod optimizer)"),
    "GraVAC defaults (TopK)": (("--compression", "topk", "--agent", "gravac"), None),
    "GraVAC defaults (PowerSGD)": (("--compression", "powersgd", "--agent", "gravac"), None),
    "dense (Horovod)": (("--baseline", "horovod"), None),
    # PyTorch's DDP allreduce: its PowerSGD hook before its start step is a plain allreduce
    "dense (DDP)": (("--baseline", "ddp-powersgd", "--powersgd-start", "1000000"), None),
    "CodecChoice auto (Horovod optimizer)": (("--compression", "auto", "--agent", "choice"),
                                             None),
    "CodecChoice auto (DDP hook)": (("--compression", "auto", "--agent", "choice", "--ddp"),
                                    None),
    # the choice's own cost at the codec its static twin sends: it starts on PowerSGD rank 1
    # and, on a slow link, keeps it (dense is priced 14x its bytes)
    "CodecChoice on powersgd:1 / dense": (("--compression", "powersgd:1|dense", "--agent",
                                           "choice"), "PowerSGD rank 1 (Horovod optimizer)"),
}
BASELINE = "DDP + PyTorch PowerSGD hook (rank 1)"


def read_steps(path: Path, warmup: int) -> list[dict[str, float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))[warmup:]
    return [{k: float(v) for k, v in r.items() if v not in ("", None) and _number(v)}
            for r in rows]


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def phases(row: dict[str, float], through_ddp: bool) -> dict[str, float]:
    """A step's time split into compute, begin, wait, finish, optimizer (seconds)."""
    begin, wait, finish = (row.get(k, 0.0) for k in ("begin_s", "wait_s", "finish_s"))
    backward, update = row["backward_s"], row["update_s"]
    if through_ddp:  # the exchange ends inside backward (the DDP hook's end of backward)
        compute = row["forward_s"] + backward - begin - wait - finish
        optimizer = update
    else:  # the Horovod optimizer's exchange ends in step()
        compute = row["forward_s"] + backward - begin
        optimizer = update - wait - finish
    return {"compute": compute, "begin": begin, "wait": wait, "finish": finish,
            "optimizer": optimizer}


def merge(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, (flags, twin) in CONFIGS.items():
        runs = sorted((args.out / "runs" / slug(name)).glob("round*/steps.csv"))
        if not runs:
            continue
        steps = [r for path in runs for r in read_steps(path, args.warmup)]
        ddp = "--ddp" in flags or "ddp-powersgd" in flags
        split = [phases(r, ddp) for r in steps] if "begin_s" in steps[0] else []
        rows.append({"config": name, "rounds": len(runs), "steps": len(steps),
                     "median_step_s": statistics.median(r["step_s"] for r in steps),
                     "round_medians": [statistics.median(r["step_s"] for r in
                                                         read_steps(p, args.warmup))
                                       for p in runs],
                     "mean_cf_sent": statistics.mean(r.get("cf_sent", 1.0) or 1.0
                                                     for r in steps),
                     "twin": twin,
                     **{f"{k}_s": statistics.median(p[k] for p in split) if split else None
                        for k in ("compute", "begin", "wait", "finish", "optimizer")}})
    write(rows, args)
    return rows


def write(rows: list[dict], args: argparse.Namespace) -> None:
    by = {r["config"]: r for r in rows}
    base = by.get(BASELINE)
    link = "unshaped links" if args.no_emulation else f"{args.rate} links (tbf)"
    lines = [f"{args.np} ranks, {args.workload}, {link}, {args.steps} steps "
             f"per run, median of the steps after {args.warmup} of every round", "",
             "| configuration | median step (s) | vs DDP + PowerSGD hook | vs its static twin | "
             "rounds (medians) | mean CF sent | compute | begin | wait | finish | optimizer |",
             "|---" * 11 + "|"]

    def f(v, spec=".3f"):
        return "—" if v is None else format(v, spec)
    for r in rows:
        twin = by.get(r["twin"]) if r["twin"] else None
        lines.append(
            f"| {r['config']} | {r['median_step_s']:.3f} | "
            f"{f(r['median_step_s'] / base['median_step_s'], '.2f') if base else '—'} | "
            f"{f(r['median_step_s'] / twin['median_step_s'], '.2f') if twin else '—'} | "
            f"{r['rounds']} ({', '.join(f'{m:.3f}' for m in r['round_medians'])}) | "
            f"{r['mean_cf_sent']:.0f} | {f(r['compute_s'])} | {f(r['begin_s'])} | "
            f"{f(r['wait_s'])} | {f(r['finish_s'])} | {f(r['optimizer_s'])} |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_time.md").write_text(table + "\n")
    with open(args.out / "step_time.csv", "w", newline="") as out:
        fields = [k for k in rows[0] if k != "round_medians"] if rows else []
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(table, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="ptb", choices=sorted(WORKLOADS))
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--warmup", type=int, default=30, help="first steps of a run left out")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--delay", default="1ms")
    p.add_argument("--no-emulation", action="store_true",
                   help="unshaped: the ranks talk over loopback, as fast as it goes")
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--merge-only", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="default: results/step_time/<workload>")
    args = p.parse_args(argv)
    args.out = args.out or Path("results/step_time") / (
        f"{args.workload}_unshaped" if args.no_emulation else args.workload)
    for flag, value, low in (("--np", args.np, 1), ("--steps", args.steps, 1),
                             ("--rounds", args.rounds, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    wanted = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [w for w in wanted if w not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; valid: {list(CONFIGS)}")
    if not args.merge_only:
        if os.geteuid() != 0 and not args.no_emulation:
            raise SystemExit("network emulation needs root: run as root")
        base, _, _ = WORKLOADS[args.workload]
        for rnd in range(args.rounds):
            for name in wanted:
                run_dir = args.out / "runs" / slug(name) / f"round{rnd}"
                if (run_dir / "summary.json").is_file():
                    continue
                print(f"[step_time] round {rnd}: {name}", flush=True)
                launch([*base, *CONFIGS[name][0], "--steps", str(args.steps),
                        "--eval-interval", str(10 * args.steps), "--eval-batches", "2",
                        "--no-progress", "--out", str(run_dir)], args,
                       shaped=not args.no_emulation)
                merge(args)
    merge(args)


if __name__ == "__main__":
    main()

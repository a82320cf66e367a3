"""A Hugging Face ``transformers`` GPT-2 under Accelerate, as a user of those tools trains it:
dense DDP, PyTorch's PowerSGD hook, and this library's hook with AdamW's gradients compressed
or under the Adam-family exchange, side by side at equal steps on PTB.

Each configuration is one ``torchrun --nproc_per_node NP`` job of ``Accelerator(cpu=True)``
(Gloo), the `gpt` workload's recipe (AdamW lr 1e-3, eps 1e-6, weight decay 0.01, 20 linear
warm-up steps, then a cosine to 0; batch 20 × 64 tokens per rank), a GPT-2 of 4 layers of
width 256 with 4 heads and a context of 64. The hook is registered the way the Accelerate guide's
recipe does; PyTorch's PowerSGD hook runs with its documented warm-up
(``start_powerSGD_iter`` = 10% of the steps) and one DDP bucket (it fails on Gloo with more).
Every job writes its ``evals.csv`` (validation perplexity every ``--eval-interval`` steps) and
``summary.json``; the table (Markdown, CSV) is merged from whatever has finished.

    .venv/bin/python -m benchmarks.hf_accelerate --steps 250 --out results/adam/hf_gpt2
    .venv/bin/python -m benchmarks.hf_accelerate --merge-only --out results/adam/hf_gpt2
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # name → (hook: None (DDP's allreduce), "powersgd-hook" or our settings; exchange)
    "dense (DDP)": (None, "off"),
    "DDP + PyTorch PowerSGD hook (rank 1)": ("powersgd-hook", "off"),
    "PowerSGD rank 1 on gradients": ({"compression": "powersgd:1"}, "off"),
    "TopK 100x on gradients": ({"compression": "topk:100"}, "off"),
    "PowerSGD rank 1 + Adam exchange": ({"compression": "powersgd:1"}, "auto"),
    # the exchange without compression: what freezing the variance alone costs
    "Adam exchange uncompressed": ({"compression": "none"}, "auto"),
    "TopK 100x + Adam exchange": ({"compression": "topk:100"}, "auto"),
    "GraVAC (PowerSGD) + Adam exchange": ({"compression": "powersgd", "agent": "gravac"},
                                         "auto"),
    "GraVAC (TopK) + Adam exchange": ({"compression": "topk", "agent": "gravac"}, "auto"),
}
BATCH, CONTEXT = 20, 64


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


# -- one job (inside torchrun) -------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.nn.parallel import DistributedDataParallel
    from transformers import GPT2Config, GPT2LMHeadModel

    from horovod_gravac import ddp
    from horovod_gravac.app import data as D
    from horovod_gravac.app.train import LearningRateFactor

    torch.set_num_threads(1)
    hook, exchange = CONFIGS[args.config]
    kwargs = []
    if hook == "powersgd-hook":  # PyTorch's hook on Gloo needs one DDP bucket
        from accelerate import DistributedDataParallelKwargs
        kwargs = [DistributedDataParallelKwargs(bucket_cap_mb=1024)]
    accelerator = Accelerator(cpu=True, kwargs_handlers=kwargs)
    rank, size = accelerator.process_index, accelerator.num_processes
    corpus = D.PTBCorpus(args.data_dir)
    train = D.batchify(corpus.train, BATCH, rank, size)
    valid = D.batchify(corpus.valid, 10, rank, size)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(corpus.vocab), n_positions=CONTEXT,
                                       n_embd=256, n_layer=4, n_head=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.01)
    state = None
    if isinstance(hook, dict):  # the Accelerate guide's recipe: the state before prepare
        state = ddp.DDPCompressionState(model, **hook)
        if exchange == "auto":
            optimizer = ddp.AdamExchangeOptimizer(optimizer, state)
    model, optimizer = accelerator.prepare(model, optimizer)
    if not isinstance(model, DistributedDataParallel):
        raise RuntimeError(f"Accelerate gave a {type(model).__name__}, not a DDP model")
    if state is not None:
        ddp.register_comm_hook(model, state=state)
    elif hook == "powersgd-hook":
        model.register_comm_hook(powersgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=1,
            start_powerSGD_iter=max(2, args.steps // 10)), powersgd.powerSGD_hook)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LearningRateFactor(20, args.steps, cosine=True))
    dense_bytes = sum(4 * p.numel() for p in model.parameters())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, evals = [], []
    batches = D.bptt_batches(train, CONTEXT)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = D.bptt_batches(train, CONTEXT)
            x, y = next(batches)
        optimizer.zero_grad()
        logits = model(input_ids=x).logits  # (labels= would shift y once more)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 y.reshape(-1))
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        rows.append({"step": step, "loss": loss.item(),
                     "phase": "frozen" if state is not None and state.adam is not None
                     and state.adam.frozen else ""})
        if step % args.eval_interval == 0 or step == args.steps:
            evals.append({"step": step, "perplexity": perplexity(model, valid, args),
                          "wall": time.perf_counter() - start})
    sent = state.communication.total_bytes if state is not None else None
    if rank == 0:
        with open(out / "steps.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(out / "evals.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(evals[0]))
            writer.writeheader()
            writer.writerows(evals)
        frozen = state.adam.frozen_step if state is not None and state.adam is not None else None
        (out / "summary.json").write_text(json.dumps({
            "config": args.config, "seed": args.seed, "steps": args.steps, "ranks": size,
            "final_perplexity": evals[-1]["perplexity"], "evals": evals,
            "MB_sent": None if sent is None else sent / 1e6,
            "dense_MB": dense_bytes * args.steps / 1e6, "frozen_step": frozen}, indent=1))
    dist.barrier()
    accelerator.end_training()


def perplexity(model, valid, args) -> float:
    """Validation perplexity: every rank its shard (the first ``--eval-batches`` windows),
    summed over ranks."""
    import torch
    import torch.distributed as dist

    from horovod_gravac.app import data as D
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i, (x, y) in enumerate(D.bptt_batches(valid, CONTEXT)):
            if i >= args.eval_batches:
                break
            logits = model(input_ids=x).logits
            total[0] += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            total[1] += y.numel()
    dist.all_reduce(total)
    model.train()
    return math.exp(total[0].item() / total[1].item())


# -- the driver ----------------------------------------------------------------------------------
def run(name: str, seed: int, args: argparse.Namespace) -> None:
    out = args.out / "runs" / slug(name) / f"seed{seed}"
    if (out / "summary.json").is_file():
        return
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(args.np), "-m",
           "benchmarks.hf_accelerate", "--worker", "--config", name, "--seed", str(seed),
           "--steps", str(args.steps), "--eval-interval", str(args.eval_interval),
           "--eval-batches", str(args.eval_batches), "--out", str(out)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} (seed {seed}) failed:\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-4000:]}")


def merge(args: argparse.Namespace) -> list[dict]:
    """One row per configuration with finished seeds: mean final perplexity, vs dense."""
    rows = []
    for name in CONFIGS:
        runs = [json.loads(p.read_text())
                for p in sorted((args.out / "runs" / slug(name)).glob("seed*/summary.json"))]
        if not runs:
            continue
        finals = [r["final_perplexity"] for r in runs]
        sent = [r["MB_sent"] for r in runs if r["MB_sent"] is not None]
        rows.append({"config": name, "seeds": len(runs),
                     "final_perplexity": sum(finals) / len(finals),
                     "per_seed": " / ".join(f"{f:.1f}" for f in finals),
                     "MB_sent": sum(sent) / len(sent) if sent else None,
                     "dense_MB": runs[0]["dense_MB"],
                     "frozen_step": " / ".join(str(r["frozen_step"]) for r in runs)
                     if runs[0]["frozen_step"] is not None else ""})
    dense = next((r for r in rows if r["config"] == "dense (DDP)"), None)
    lines = [f"Hugging Face GPT-2 (4 × 256) under Accelerate, {args.np} processes (Gloo), "
             f"{args.steps} steps, PTB validation perplexity (mean over seeds)", "",
             "| configuration | seeds | final perplexity | per seed | vs dense | "
             "× fewer bytes (our hook) | variance frozen at step |", "|---" * 7 + "|"]
    for r in rows:
        versus = f"{r['final_perplexity'] / dense['final_perplexity'] - 1:+.1%}" if dense else "—"
        fewer = f"{r['dense_MB'] / r['MB_sent']:.1f}" if r["MB_sent"] else "—"
        lines.append(f"| {r['config']} | {r['seeds']} | {r['final_perplexity']:.1f} | "
                     f"{r['per_seed']} | {versus} | {fewer} | {r['frozen_step'] or '—'} |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf_accelerate.md").write_text(table + "\n")
    with open(args.out / "hf_accelerate.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["config", "seeds", "final_perplexity",
                                               "per_seed", "MB_sent", "dense_MB",
                                               "frozen_step"])
        writer.writeheader()
        writer.writerows(rows)
    print(table, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", default="0")
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--merge-only", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "adam" / "hf_gpt2")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag, value in (("--np", args.np), ("--steps", args.steps),
                        ("--eval-interval", args.eval_interval),
                        ("--eval-batches", args.eval_batches)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.worker:
        if args.config not in CONFIGS:
            raise ValueError(f"--config must be one of {list(CONFIGS)}, got {args.config!r}")
        worker(args)
        return
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    wanted = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [w for w in wanted if w not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; valid: {list(CONFIGS)}")
    if not args.merge_only:
        for seed in seeds:
            for name in wanted:
                print(f"[hf_accelerate] seed {seed}: {name}", flush=True)
                run(name, seed, args)
                merge(args)
    merge(args)


if __name__ == "__main__":
    main()

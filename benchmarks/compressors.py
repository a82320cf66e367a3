"""Compressor cost per training step on the paper's real layer shapes (one process, one thread).

For every compressor and model: time of error feedback + compress + decompress/aggregate for
all of the model's gradients, side by side in the same run with
  (a) the memcpy floor: clone every gradient,
  (b) the straightforward reference implementation of the same algorithm (benchmarks/reference.py),
  (c) with ``--grace DIR`` (a checkout of https://github.com/sands-lab/grace, unchanged),
      GRACE's own TopK and QSGD with its residual / no memory, the same steps (compensate,
      compress, memory update, decompress) on the same gradients,
plus bytes on the wire (and per kept element for sparsifiers: 8 = float32 value + int32
index, less with a bitmap of positions or half-precision values), and the multi-level speed-up (compress to θmin, then select within it
to θmin·θs, against compressing directly to θmin·θs). Writes CSV, Markdown and a PNG plot.

    python -m benchmarks.compressors --models resnet101 --cf 100
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from horovod_gravac import compression as C
from horovod_gravac.app.models import parameter_shapes
from benchmarks.reference import REFERENCES

PAPER_MODELS = ("resnet101", "vgg16", "lstm1500")
MULTILEVEL = ("topk", "randomk", "dgc", "redsync", "sidco")
#: sparsifiers that can send their values in half precision (``value_dtype``)
HALF_VALUES = ("topk", "dgc")


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_compressor(name: str, cf: float, **params) -> C.Compressor:
    compressor = C.create(name, **params)
    if compressor.adjustable_cf:
        compressor.cf = cf
    elif name == "threshold":  # λ that keeps about 1/cf of N(0, 1e-2²) gradients
        compressor.threshold = 1e-2 * float(torch.distributions.Normal(0, 1).icdf(
            torch.tensor(1 - 0.5 / cf)))
    return compressor


def library_step(compressor: C.Compressor, memory: C.Memory, grads: dict[str, torch.Tensor],
                 step: int, outputs: dict[str, torch.Tensor]) -> int:
    """One step of EF + compress + decompress for every gradient, decoded into ``outputs``
    (as the engine decodes into each ``p.grad``); returns bytes sent."""
    sent = 0
    for name, grad in grads.items():
        compensated = memory.compensate(grad, name)
        payload, ctx = compressor.compress(compensated, name, step)
        sent += C.wire_bytes(payload)
        for _ in range(ctx.rounds - 1):  # PowerSGD's Q, from this rank's P as the sum
            payload = compressor.next_round(payload, ctx)
            sent += C.wire_bytes(payload)
        memory.update(name, compensated, compressor, payload, ctx)
        compressor.aggregate([payload], ctx, out=outputs[name])
    return sent


#: GRACE's compressors timed beside ours: (our name, GRACE module, class, memory module, class)
GRACE = {"topk": ("topk", "TopKCompressor", "residual", "ResidualMemory"),
         "qsgd": ("qsgd", "QSGDCompressor", "none", "NoneMemory")}


def grace_pair(directory: Path, name: str, cf: float):
    """GRACE's compressor and memory for ``name`` from its checkout (imported, not copied)."""
    import importlib
    import sys
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    module, cls, memory_module, memory_cls = GRACE[name]
    compressor = getattr(importlib.import_module(f"grace_dl.torch.compressor.{module}"), cls)
    memory = getattr(importlib.import_module(f"grace_dl.torch.memory.{memory_module}"),
                     memory_cls)
    return (compressor(1.0 / cf) if name == "topk" else compressor(127)), memory()


def grace_step(compressor, memory, grads: dict[str, torch.Tensor]) -> None:
    """GRACE's Communicator.send_step plus the receiver's decompress, for one rank."""
    for name, grad in grads.items():
        tensor = memory.compensate(grad, name)
        payload, ctx = compressor.compress(tensor, name)
        memory.update(tensor, name, compressor, payload, ctx)
        compressor.decompress(payload, ctx)


def reference_step(reference: Callable, cf: float, grads: dict[str, torch.Tensor],
                   residuals: dict[str, torch.Tensor]) -> None:
    for name, grad in grads.items():
        compensated = grad + residuals[name]
        decompressed = reference(compensated.view(-1), cf).view_as(grad)
        residuals[name] = compensated - decompressed


def benchmark_model(model: str, names: list[str], cf: float, repeat: int, theta_min: float,
                    progress, value_dtype: str | None = None,
                    grace: Path | None = None) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(s, generator=gen) * 1e-2 for n, s in parameter_shapes(model)}
    numel = sum(g.numel() for g in grads.values())
    floor = timed(lambda: [g.clone() for g in grads.values()], repeat)
    rows = []
    variants = [(name, {}) for name in names] + [
        (name, {"value_dtype": value_dtype}) for name in names
        if value_dtype and name in HALF_VALUES]
    for name, params in variants:
        compressor = make_compressor(name, cf, **params)
        memory = C.create_memory(None, compressor)
        steps = iter(range(10**9))
        outputs = {n: torch.empty_like(g) for n, g in grads.items()}
        sent = library_step(compressor, memory, grads, 0, outputs)
        lib = timed(lambda: library_step(compressor, memory, grads, next(steps), outputs), repeat)
        kept = sum(C.num_selected(g.numel(), cf) for g in grads.values()) \
            if isinstance(compressor, C.Sparsifier) and compressor.adjustable_cf else None
        label = f"{name} ({params['value_dtype']} values)" if params else name
        row = {"model": model, "compressor": label, "cf": cf if compressor.adjustable_cf else
               round(4 * numel / max(sent, 1), 2), "params_M": round(numel / 1e6, 2),
               "bytes_sent": sent, "bytes_per_kept": sent / kept if kept else None,
               "memcpy_ms": floor * 1e3, "library_ms": lib * 1e3,
               "x_memcpy": lib / floor, "reference_ms": None, "speedup_vs_reference": None,
               "grace_ms": None, "speedup_vs_grace": None,
               "multilevel_ms": None, "direct_ms": None, "multilevel_speedup": None}
        if params:
            rows.append(row)
            progress.update(1)
            continue
        if name in REFERENCES:
            residuals = {n: torch.zeros_like(g) for n, g in grads.items()}
            ref = timed(lambda: reference_step(REFERENCES[name], cf, grads, residuals), repeat)
            row.update(reference_ms=ref * 1e3, speedup_vs_reference=ref / lib)
        if grace is not None and name in GRACE:
            theirs = grace_pair(grace, name, cf)
            grace_s = timed(lambda: grace_step(*theirs, grads), repeat)
            row.update(grace_ms=grace_s * 1e3, speedup_vs_grace=grace_s / lib)
        if name in MULTILEVEL:
            row.update(multilevel(name, grads, theta_min, cf, repeat))
        rows.append(row)
        progress.update(1)
    return rows


def multilevel(name: str, grads: dict[str, torch.Tensor], theta_min: float, cf: float,
               repeat: int) -> dict:
    """GraVAC's C(C(g, θmin), θs): given g_min, the cost of g_c vs compressing g directly."""
    low, direct = make_compressor(name, theta_min), make_compressor(name, cf)
    first = {n: low.compress(g, n, 0) for n, g in grads.items()}
    ml = timed(lambda: [low.recompress(p, ctx, cf) for p, ctx in first.values()], repeat)
    dr = timed(lambda: [direct.compress(g, n, 0) for n, g in grads.items()], repeat)
    return {"multilevel_ms": ml * 1e3, "direct_ms": dr * 1e3, "multilevel_speedup": dr / ml}


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict]) -> str:
    head = ("| model | compressor | CF | MB sent | B per kept element | ms/step | × memcpy | "
            "reference ms | × faster than reference | GRACE ms | × faster than GRACE | "
            "multi-level × faster |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['compressor']} | {r['cf']:g} | "
                     f"{r['bytes_sent'] / 1e6:.2f} | {fmt(r['bytes_per_kept'], '.2f')} | "
                     f"{r['library_ms']:.0f} | {r['x_memcpy']:.2f} | "
                     f"{fmt(r['reference_ms'], '.0f')} | {fmt(r['speedup_vs_reference'], '.2f')} | "
                     f"{fmt(r['grace_ms'], '.0f')} | {fmt(r['speedup_vs_grace'], '.2f')} | "
                     f"{fmt(r['multilevel_speedup'], '.2f')} |")
    floors = sorted({(r['model'], round(r['memcpy_ms'])) for r in rows})
    lines.append("")
    lines.append("memcpy floor (clone every gradient): " +
                 ", ".join(f"{m} {ms} ms" for m, ms in floors))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model]
        x = range(len(sub))
        ax.bar([i - 0.2 for i in x], [r["x_memcpy"] for r in sub], 0.4, label="library")
        ax.bar([i + 0.2 for i in x], [r["reference_ms"] / r["memcpy_ms"] if r["reference_ms"]
                                      else 0 for r in sub], 0.4, label="straightforward reference")
        ax.axhline(3, color="gray", ls="--", lw=1, label="3× memcpy target")
        ax.set_yscale("log")
        ax.set_xticks(list(x), [r["compressor"] for r in sub], rotation=60)
        ax.set_ylabel("time per step / memcpy floor")
        ax.set_title(f"{model} ({sub[0]['params_M']}M params)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(PAPER_MODELS))
    parser.add_argument("--compressors", default="all", help="comma-separated names or 'all'")
    parser.add_argument("--cf", type=float, default=100.0, help="CF of adjustable compressors")
    parser.add_argument("--theta-min", type=float, default=10.0, help="first level of multi-level")
    parser.add_argument("--value-dtype", default="float16",
                        help=f"also run {', '.join(HALF_VALUES)} with values in this dtype "
                             "('none' to skip)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--grace", type=Path, default=None, metavar="DIR",
                        help="a checkout of GRACE (github.com/sands-lab/grace): time its TopK "
                             "and QSGD beside ours")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/compressors"))
    args = parser.parse_args(argv)
    names = C.names() if args.compressors == "all" else args.compressors.split(",")
    for n in names:
        C.create(n)  # unknown names fail here, before any timing
    models = args.models.split(",")
    for m in models:
        parameter_shapes(m)
    if args.grace is not None and not (args.grace / "grace_dl" / "torch").is_dir():
        raise FileNotFoundError(f"--grace {args.grace}: no grace_dl/torch in it; give a "
                                "checkout of https://github.com/sands-lab/grace")
    C.validate_cf(args.cf)
    if args.theta_min >= args.cf:
        raise ValueError(f"--theta-min ({args.theta_min:g}) must be below --cf ({args.cf:g})")
    value_dtype = None if args.value_dtype == "none" else args.value_dtype
    C.sparsifiers.check_value_dtype(value_dtype)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    rows: list[dict] = []
    extra = sum(1 for n in names if value_dtype and n in HALF_VALUES)
    with tqdm(total=len(models) * (len(names) + extra), desc="compressors") as progress:
        for model in models:
            rows += benchmark_model(model, names, args.cf, args.repeat, args.theta_min, progress,
                                    value_dtype, args.grace)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "compressors.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (args.out / "compressors.md").write_text(table + "\n")
    plot(rows, args.out / "compressors.png")
    print(table)
    print(f"\nwrote {args.out}/compressors.csv, compressors.md, compressors.png")


if __name__ == "__main__":
    main()

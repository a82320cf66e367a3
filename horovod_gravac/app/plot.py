"""Plots from training run directories (``gravac-train --out DIR``).

    gravac-plot runs/dense runs/gravac runs/topk100 --out plots/

writes ``cf_gain.png`` (CF and compression gain over steps, one panel per run that has
them), ``quality_vs_time.png`` (the evaluation metric against wall time, all runs) and
``bytes_vs_time.png`` (cumulative bytes sent against wall time, all runs).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read_run(directory: Path) -> dict:
    if not (directory / "steps.csv").is_file():
        raise FileNotFoundError(f"{directory} is not a run directory (no steps.csv): pass the "
                                "--out directories of gravac-train runs")
    with open(directory / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    evals = []
    if (directory / "evals.csv").is_file():
        with open(directory / "evals.csv") as f:
            evals = list(csv.DictReader(f))
    summary = json.loads((directory / "summary.json").read_text()) \
        if (directory / "summary.json").is_file() else {}
    return {"name": directory.name, "steps": steps, "evals": evals, "summary": summary}


def _floats(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]


def _per_run_panels(plt, runs: list[dict], draw, path: Path, legend_loc: str) -> Path:
    """One panel per run, stacked, each drawn by ``draw(ax, run, steps) -> twin axis``."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.6 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        twin = draw(ax, run, _floats(run["steps"], "step"))
        ax.set_title(run["name"])
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [l.get_label() for l in lines], fontsize=7, loc=legend_loc)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_cf_gain(ax, run: dict, steps: list[float]):
    """The CF achieved and sent (log scale), the gains on a twin axis."""
    ax.semilogy(steps, _floats(run["steps"], "cf"), label="dense bytes / bytes", color="C0")
    if run["steps"] and run["steps"][0].get("cf_sent") not in (None, ""):
        ax.semilogy(steps, _floats(run["steps"], "cf_sent"), label="CF sent", color="C3")
    ax.set_ylabel("CF (dense bytes / bytes)")
    twin = ax.twinx()
    twin.plot(steps, _floats(run["steps"], "delta_c"), color="C1", label="δc (gain)")
    twin.plot(steps, _floats(run["steps"], "delta_min"), color="C2", label="δmin", alpha=0.7)
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("compression gain")
    return twin


def _draw_link_model(ax, run: dict, steps: list[float]):
    """Measured and predicted step time, the fitted link bandwidth on a twin axis."""
    ax.plot(steps, _floats(run["steps"], "step_s"), color="C0", alpha=0.5,
            label="step time (measured)")
    ax.plot(steps, _floats(run["steps"], "predicted_step_s"), color="C3",
            label="predicted for the CF chosen")
    ax.set_ylabel("seconds")
    twin = ax.twinx()
    twin.plot(steps, [b / 1e6 for b in _floats(run["steps"], "link_bandwidth")], color="C2",
              label="fitted link (MB/s)")
    twin.set_ylabel("MB/s")
    return twin


def plot_runs(runs: list[dict], out: Path, metric: str | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [_per_run_panels(plt, runs, _draw_cf_gain, out / "cf_gain.png", "lower right")]
    modelled = [run for run in runs if any(r.get("link_bandwidth") not in (None, "")
                                           for r in run["steps"])]
    if modelled:  # GraVAC's cost model: measured vs predicted step time, the fitted link
        written.append(_per_run_panels(plt, modelled, _draw_link_model, out / "link_model.png",
                                       "upper right"))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for run in runs:
        rows = [r for r in run["evals"] if metric is None or r["metric"] == metric]
        if rows:
            chosen = metric or rows[-1]["metric"]
            rows = [r for r in rows if r["metric"] == chosen]
            ax1.plot(_floats(rows, "wall"), _floats(rows, "value"), marker="o", label=run["name"])
            ax1.set_ylabel(chosen)
        ax2.plot(_floats(run["steps"], "wall"), [b / 1e6 for b in _floats(run["steps"], "total_bytes")],
                 label=run["name"])
    ax1.set_xlabel("wall time (s)")
    ax1.set_title("quality vs wall time")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("wall time (s)")
    ax2.set_ylabel("MB sent per rank (cumulative)")
    ax2.set_yscale("log")
    ax2.set_title("bytes vs wall time")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_time.png", dpi=110)
    extent = ax2.get_window_extent().transformed(fig.dpi_scale_trans.inverted())
    fig.savefig(out / "bytes_vs_time.png", dpi=110, bbox_inches=extent.expanded(1.25, 1.3))
    plt.close(fig)
    written += [out / "quality_vs_time.png", out / "bytes_vs_time.png"]
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gravac-plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=Path("plots"))
    parser.add_argument("--metric", default=None, help="perplexity, accuracy, top5 (default: last)")
    args = parser.parse_args(argv)
    runs = [read_run(d) for d in args.runs]
    for path in plot_runs(runs, args.out, args.metric):
        print(path)


if __name__ == "__main__":
    main()

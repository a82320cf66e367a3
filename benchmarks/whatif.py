"""What-if: a configuration's step time and time to target at N workers on any link.

Calibrated from one measured run per configuration (emulated here: ``launch/netem.py``, every
rank behind its own shaped link), the model predicts a step as

    t(N) = compute + codec(N) + wait(N)
    wait(N) = r·a + s(N)·λ + B(N)·β

* **compute** — forward, backward and the optimizer without this library's work: the
  calibration run's median of forward + backward − begin + update − wait − finish.
* **codec(N)** — error feedback, compression, packing (``begin_s``) and decoding (``finish_s``)
  of the run, the decoding part scaled by the compressed bytes a rank decodes
  (:func:`step_traffic`: an allgather's N payloads, a sum's or an alltoall's one), so gathered
  exchanges pay a decode per peer.
* **r**, **s(N)** — the step's exchange rounds (a bucket's round: its fused collectives start
  together; PowerSGD's P then Q are two, a two-stage exchange's alltoall then allgather two)
  and their collectives' ring message steps (``transport.link_steps``: an allreduce 2(N−1),
  an allgather or alltoall N−1), as the engine counts them (``steps.csv``: ``rounds``,
  ``link_steps``); s grows as N−1 for every kind.
* **B(N)** — the link bytes of a step from the tensor shapes and the compressor
  (``Compressor.expected_rounds`` bound to N ranks; ``transport.link_bytes``: an allreduce
  2(N−1)/N of its buffer, an allgather N−1 payloads, a two-stage exchange ≈ 2(N−1)/N of the
  quantized tensor), exactly what the engine puts on the link.
* **the link** — a (seconds per round), λ (per message step) and β (per link byte): a and β
  fitted by non-negative least squares to the measured waits of all calibration runs (one
  link for every configuration), λ given (``--emulated-step-latency-us``; 0 here: this
  machine's kernel has no netem qdisc, so ``launch/netem.py`` shapes the rate only and the
  links add no delay).

On this machine the emulated ranks share its cores: compute and codec measured with N₀
ranks are carried to N as the host share max(1, N/cores) / max(1, N₀/cores). The same
sharing is what a round's fixed cost a measures when N₀ > cores: a round cannot end before
every rank's threads have run, about one scheduler period whatever N (measured on the digits
CNN, wait less link time per round: < 1 ms at 2 ranks on 2 cores, 11–32 ms at 4, 14–43 ms
at 8), so a holds at every N above the cores and is 0 at or below them. On a cluster every
worker has its own device: the measured compute and codec are divided by the calibration's
host share, and a and λ are ``--round-ms`` and ``--step-latency-us``. The model assumes
communication does not overlap backward (the engine starts a bucket's collectives when its
last gradient arrives; with one bucket, as in the small models here, nothing overlaps).

**Validation** (``--measure`` then ``--validate``): the configurations of :data:`CONFIGS`
measured at 2, 4 and 8 ranks, calibrated at ``--calibrate-at`` ranks, predicted at the
others; the table gives predicted vs measured median step and the error.

**Projection** (``--project``): from the runs at ``--project-from`` ranks (default: as many
as this machine has cores, so no rank shared a core and there is no sharing to undo), every
configuration at N = 2…256
on 1–400 Gbit/s (β = 8 / bandwidth; λ and a as ``--step-latency-us`` and ``--round-ms``,
stated in the output), the time to target from steps to target measured end to end
(``--steps-to-target``, a CSV of ``benchmarks.end_to_end``), and the CF GraVAC's cost model
would send there: the ladder CF with the best gain / predicted step time among those with a
gain ≥ ε (``agents.gravac.compression_throughputs``), from TopK gains measured on the
workload's own gradients.

**Paper scale** (``--paper``): ResNet-101, VGG16 and the LSTM 2×1500 (their real gradient
shapes), 32 workers on 10/25/100 Gbit/s. Nothing there is measured on a GPU here, so every
input is derived and said so in the output: compute = the model's forward + backward FLOPs
(counted by ``torch.utils.flop_counter`` on the meta device, the paper's batch per worker)
over ``--gpu-tflops`` sustained; codec = each tensor's compress and decode time measured on
this CPU (one thread) scaled by this CPU's memcpy bandwidth over ``--gpu-memory-gbps``
(compression is memory-bound), at least ``--kernel-floor-us`` per tensor and pass (an allgather's N payloads are decoded
in one pass); the engine's rounds
per 25 MB bucket; gains from one gradient of each model (random CIFAR-shaped images,
or PTB). It says at which N allgather-based TopK stops paying against dense allreduce, and
what GraVAC's cost model picks.

    sudo .venv/bin/python -m benchmarks.whatif --workload digits --measure --ranks 4,2,8
    .venv/bin/python -m benchmarks.whatif --workload digits --validate --project
    .venv/bin/python -m benchmarks.whatif --paper
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from benchmarks.end_to_end import WORKLOADS, launch, slug
from benchmarks.step_time import phases, read_steps
from horovod_gravac import compression as C
from horovod_gravac.agents.gravac import cf_ladder, compression_throughputs
from horovod_gravac.app.models import create_model, parameter_shapes
from horovod_gravac.agents.costmodel import Link, Traffic, fit_link
from horovod_gravac.engine import BucketLayout
from horovod_gravac.engine import step_traffic as engine_step_traffic

#: the exchanges the model is validated on: name → gravac-train flags
CONFIGS: dict[str, tuple[str, ...]] = {
    "dense (allreduce)": ("--compression", "none"),
    "TopK 100x (allgather)": ("--compression", "topk", "--agent", "static", "--cf", "100"),
    "8-bit (allgather)": ("--compression", "8bit:exchange=allgather"),
    "8-bit (two-stage)": ("--compression", "8bit:exchange=two_stage"),
    "PowerSGD rank 1 (allreduce)": ("--compression", "powersgd:1"),
}
#: which row of an end-to-end table has a configuration's steps to target
END_TO_END_NAMES = {"dense (allreduce)": "dense (Horovod)", "TopK 100x (allgather)": "TopK 100x",
                    "PowerSGD rank 1 (allreduce)": "PowerSGD rank 1"}
TOPK = "TopK 100x (allgather)"
DENSE = "dense (allreduce)"
WORLD_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
BANDWIDTHS_GBIT = (1, 10, 25, 100, 400)
GRAVAC_LADDER = cf_ladder(10.0, 1000.0)  # GraVAC's defaults: θmin 10, θmax 1000
GRAVAC_EPSILON = 0.7
BUCKET_BYTES = 25 * 2**20  # the engine's default fusion bucket (25 MB of float32 gradients)


# -- traffic and the link: the library's step model ----------------------------------------
def step_traffic(shapes: Iterable[tuple[str, torch.Size]], compressor: C.Compressor,
                 uncompressed: frozenset[str], cf: float | None, world_size: int) -> Traffic:
    """The traffic of a step that compresses every tensor not in ``uncompressed`` with
    ``compressor`` at ``cf`` (the rest go dense, summed), on ``world_size`` ranks, in the
    engine's default buckets (:func:`horovod_gravac.engine.step_traffic`)."""
    shapes = dict(shapes)
    layout = BucketLayout.by_size([(n, 4 * s.numel()) for n, s in shapes.items()], BUCKET_BYTES)
    compressor.bind(0, world_size)
    return engine_step_traffic(compressor, shapes, uncompressed, layout.buckets, world_size, cf)


def cluster_link(gbit_per_s: float, per_step_s: float, per_round_s: float) -> Link:
    """A cluster's link: ``gbit_per_s`` per worker, a message step's latency, and a fixed
    cost per exchange round."""
    if not gbit_per_s > 0:
        raise ValueError(f"link bandwidth must be > 0 Gbit/s, got {gbit_per_s!r}")
    return Link(per_round_s, per_step_s, 8 / (gbit_per_s * 1e9))


def host_share(ranks: int, cores: int) -> float:
    """How many ranks share one core of the emulating machine (at least 1)."""
    return max(1.0, ranks / cores)


# -- calibration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """What one measured run says of a configuration (medians over its steps)."""

    name: str
    model: str
    ranks: int
    compression: str
    cf: float | None
    uncompressed: frozenset[str]
    compute_s: float
    begin_s: float
    finish_s: float
    wait_s: float
    step_s: float
    link_bytes: float
    rounds: float
    link_steps: float
    shapes: tuple[tuple[str, torch.Size], ...] = field(repr=False, default=())

    @classmethod
    def from_run(cls, run_dir: Path, name: str, warmup: int) -> "Calibration":
        """A run's ``config.json`` and ``steps.csv`` (the steps after ``warmup``)."""
        from horovod_gravac.app.train import parse_patterns
        config = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = read_steps(run_dir / "steps.csv", 0)
        rows = rows[warmup:] if len(rows) > warmup else rows
        missing = [c for c in ("rounds", "link_steps", "begin_s") if c not in rows[0]]
        if missing:
            raise ValueError(f"{run_dir}: steps.csv has no {', '.join(missing)}: a run through "
                             "this library's engine (not --baseline) is needed")

        def median(fn: Callable[[dict[str, float]], float]) -> float:
            return statistics.median(fn(r) for r in rows)

        def compute(row: dict[str, float]) -> float:  # the Horovod optimizer's path
            split = phases(row, through_ddp=False)
            return split["compute"] + split["optimizer"]
        shapes = tuple(parameter_shapes(config["model"]))
        uncompressed = C.uncompressed_tensors(((n, s.numel()) for n, s in shapes),
                                              config["min_compress_numel"],
                                              parse_patterns(config.get("compress_pattern")))
        return cls(
            name=name, model=config["model"], ranks=int(summary["ranks"]),
            compression=config["compression"], cf=config.get("cf"), uncompressed=uncompressed,
            compute_s=median(compute),
            begin_s=median(lambda r: r["begin_s"]), finish_s=median(lambda r: r["finish_s"]),
            wait_s=median(lambda r: r["wait_s"]), step_s=median(lambda r: r["step_s"]),
            link_bytes=median(lambda r: r["link_bytes"]),
            rounds=median(lambda r: r["rounds"]),
            link_steps=median(lambda r: r["link_steps"]), shapes=shapes)

    def compressor(self, cf: float | None = None) -> C.Compressor:
        compressor = C.create(self.compression)
        if compressor.adjustable_cf and (cf or self.cf):
            compressor.cf = cf or self.cf
        return compressor

    def traffic(self, world_size: int, cf: float | None = None) -> Traffic:
        compressor = self.compressor(cf)
        return step_traffic(self.shapes, compressor, self.uncompressed,
                            compressor.cf if compressor.adjustable_cf else None, world_size)


@dataclass(frozen=True)
class Prediction:
    compute_s: float
    codec_s: float
    wait_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.codec_s + self.wait_s


def predict(cal: Calibration, link: Link, world_size: int, cpu_scale: float,
            cf: float | None = None) -> Prediction:
    """``cal``'s configuration (at ``cf``, default its own) on ``world_size`` ranks behind
    ``link``, its compute and codec times multiplied by ``cpu_scale``."""
    here, there = cal.traffic(cal.ranks), cal.traffic(world_size, cf)
    decode = cal.finish_s * (there.decoded_bytes / here.decoded_bytes
                             if here.decoded_bytes else 1.0)
    steps = cal.link_steps * (world_size - 1) / (cal.ranks - 1)
    return Prediction(cal.compute_s * cpu_scale, (cal.begin_s + decode) * cpu_scale,
                      link.wait(cal.rounds, steps, there.link_bytes))


def emulated_link(fitted: Link, calibrated_at: int, world_size: int, cores: int) -> Link:
    """The fitted link at another world size on this machine: a round's fixed cost is the
    wait for every rank's threads to run when ranks outnumber cores, so it holds above the
    cores if it was measured above them, and is 0 at or below them."""
    if calibrated_at > cores and world_size <= cores:
        return Link(0.0, fitted.per_step, fitted.per_byte)
    return fitted


def calibrations(out: Path, ranks: int, warmup: int) -> dict[str, Calibration]:
    """Every configuration measured at ``ranks`` ranks under ``out``."""
    found = {}
    for name in CONFIGS:
        run = out / "runs" / f"np{ranks}" / slug(name)
        if (run / "summary.json").is_file():
            found[name] = Calibration.from_run(run, name, warmup)
    if not found:
        raise FileNotFoundError(f"no measured run at {ranks} ranks under {out / 'runs'}: run "
                                f"--measure --ranks {ranks} first")
    return found


def fitted_link(cals: Mapping[str, Calibration], per_step: float | None = None) -> Link:
    """The link fitted to the calibration runs' waits (``per_step``: λ given, see
    :func:`fit_link`)."""
    return fit_link([(c.rounds, c.link_steps, c.traffic(c.ranks).link_bytes, c.wait_s)
                     for c in cals.values()], per_step)


# -- gains (what GraVAC's cost model ranks CFs by) -------------------------------------------
def energy_ratios(model: torch.nn.Module,
                  batches: Iterable[Callable[[torch.nn.Module], torch.Tensor]],
                  uncompressed: frozenset[str],
                  energies: Callable[[str, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Per loss of ``batches``, Σ energies(name, g) / Σ‖g‖² over the compressed tensors of
    ``model``'s gradient (float64): the numerators of a fresh gain over its reference."""
    ratios = []
    for loss_of in batches:
        model.zero_grad(set_to_none=True)
        loss_of(model).backward()
        energy, reference = 0.0, 0.0
        for name, p in model.named_parameters():
            if p.grad is None or name in uncompressed:
                continue
            g = p.grad.detach()
            energy = energy + energies(name, g).double()
            reference += float(g.double().square().sum())
        ratios.append(energy / max(reference, 1e-30))
    return ratios


def topk_gains(model: torch.nn.Module, batches: Iterable[Callable[[torch.nn.Module], torch.Tensor]],
               uncompressed: frozenset[str], ladder: Sequence[float]) -> dict[float, float]:
    """GraVAC's fresh gain δ(c) = Σ‖TopK_c(g)‖² / Σ‖g‖² over the compressed tensors, per
    ladder CF, on the gradients of ``model`` for each loss of ``batches`` (mean over them)."""
    topk = C.create("topk")
    ratios = energy_ratios(model, batches, uncompressed,
                           lambda name, g: topk.energy_profile(g, list(ladder), name, sample=None))
    return {cf: float(v) for cf, v in zip(ladder, sum(ratios) / len(ratios))}


def codec_gains(model: torch.nn.Module,
                batches: Iterable[Callable[[torch.nn.Module], torch.Tensor]],
                uncompressed: frozenset[str], candidates: C.Candidates) -> list[float]:
    """CodecChoice's gain δ_k = Σ‖C_k(g)‖² / Σ‖g‖² of every candidate of the set, over the
    compressed tensors (the rest go dense, losing nothing), exactly
    (``Candidates.energies``), on the gradients of ``model`` for each loss of ``batches``
    (mean over them)."""
    ratios = energy_ratios(model, batches, uncompressed,
                           lambda name, g: candidates.energies(g, name))
    return [float(v) for v in sum(r.clamp(max=1.0) for r in ratios) / len(ratios)]


def codec_choice(gains: Mapping[str, float], step_times: Mapping[str, float],
                 epsilon: float = GRAVAC_EPSILON) -> str:
    """The configuration CodecChoice sends at these step times: the best gain / step time
    among those with a gain ≥ ε (``agents.gravac.compression_throughputs``, as online)."""
    scores = compression_throughputs(gains, step_times, epsilon)
    return max(scores, key=scores.get)


def gravac_choice(gains: Mapping[float, float], step_times: Mapping[float, float],
                  epsilon: float = GRAVAC_EPSILON) -> str:
    """The CF GraVAC's cost model sends at these step times ('dense' when no CF's gain
    reaches ε: it sends dense)."""
    scores = compression_throughputs(gains, step_times, epsilon)
    return f"{max(scores, key=scores.get):g}" if scores else "dense"


def workload_batches(workload: str, count: int, seed: int = 0
                     ) -> tuple[str, list[Callable[[torch.nn.Module], torch.Tensor]]]:
    """(model name, ``count`` losses of one rank's batch) of a calibration workload."""
    from horovod_gravac.app import data
    gen = torch.Generator().manual_seed(seed)
    if workload == "digits":
        x, y, _, _ = data.load_digits_images()
        picks = [torch.randint(len(x), (16,), generator=gen) for _ in range(count)]
        return "cnn_digits", [lambda m, i=i: torch.nn.functional.cross_entropy(m(x[i]), y[i])
                              for i in picks]
    tokens = data.PTBCorpus().train
    model = {"ptb": "lstm200", "gpt": "gpt4x256"}[workload]
    starts = [int(s) for s in torch.randint(len(tokens) - 20 * 36, (count,), generator=gen)]
    return model, [lambda m, s=s: lm_loss(m, tokens, s) for s in starts]


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Next-token cross-entropy of one worker's batch (the paper's 20 streams × 35 tokens)
    from ``tokens[start:]``."""
    chunk = tokens[start:start + 20 * 36].view(20, 36)
    out = model(chunk[:, :-1])
    logits = out[0] if isinstance(out, tuple) else out
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             chunk[:, 1:].reshape(-1))


# -- measuring, validating, projecting ---------------------------------------------------------
def measure(args: argparse.Namespace) -> None:
    """One emulated run per configuration and world size, kept on disk (a stopped benchmark
    loses only the run in flight)."""
    if os.geteuid() != 0:
        raise SystemExit("network emulation needs root: run --measure as root")
    base, _, _ = WORKLOADS[args.workload]
    for ranks in args.ranks:
        for name in args.configs:
            run_dir = args.out / "runs" / f"np{ranks}" / slug(name)
            if (run_dir / "summary.json").is_file():
                continue
            print(f"[whatif] {ranks} ranks: {name}", flush=True)
            job = argparse.Namespace(np=ranks, rate=args.rate, delay=args.delay)
            launch([*base, *CONFIGS[name], "--steps", str(args.steps), "--eval-interval",
                    str(10 * args.steps), "--eval-batches", "1", "--no-progress",
                    "--out", str(run_dir)], job, shaped=True)


def validate(args: argparse.Namespace) -> list[dict]:
    """Predicted against measured median step at every measured world size."""
    cals = calibrations(args.out, args.calibrate_at, args.warmup)
    link = fitted_link(cals, args.emulated_step_latency_us * 1e-6)
    rows = []
    for ranks in sorted(int(p.name[2:]) for p in (args.out / "runs").glob("np*")):
        share = host_share(ranks, args.cores) / host_share(args.calibrate_at, args.cores)
        for name, measured in calibrations(args.out, ranks, args.warmup).items():
            if name not in cals:
                continue
            cal = cals[name]
            p = predict(cal, emulated_link(link, args.calibrate_at, ranks, args.cores), ranks,
                        share)
            rows.append({
                "config": name, "ranks": ranks, "calibrated_at": args.calibrate_at,
                "predicted_step_ms": 1e3 * p.step_s, "measured_step_ms": 1e3 * measured.step_s,
                "error_pct": 100 * (p.step_s / measured.step_s - 1),
                "predicted_wait_ms": 1e3 * p.wait_s, "measured_wait_ms": 1e3 * measured.wait_s,
                "predicted_cpu_ms": 1e3 * (p.compute_s + p.codec_s),
                "measured_cpu_ms": 1e3 * (measured.compute_s + measured.begin_s
                                          + measured.finish_s),
                "link_kb_model": cal.traffic(ranks).link_bytes / 1e3,
                "link_kb_measured": measured.link_bytes / 1e3,
                "rounds": measured.rounds, "link_steps": measured.link_steps})
    head = (f"{args.workload}, {args.rate} links, calibrated at {args.calibrate_at} ranks "
            f"(one run per configuration); fitted link: {1e3 * link.per_round:.2f} ms per "
            f"round (above {args.cores} ranks), {1e3 * link.per_step:.2f} ms per ring message "
            f"step (given), "
            f"{link.gbit_per_s * 1e3:.0f} Mbit/s; host share max(1, N/{args.cores})")
    write_table(rows, args.out / "validation", head)
    plot_validation(rows, args.out / "validation.png")
    return rows


def load_steps_to_target(path: Path | None) -> dict[str, float]:
    """Steps to target per configuration of :data:`CONFIGS`, from an end-to-end CSV."""
    if path is None:
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"--steps-to-target {path}: no such file (a benchmarks."
                                "end_to_end CSV, e.g. results/end_to_end/ptb_engine/end_to_end.csv)")
    with open(path) as f:
        table = {r["config"]: r for r in csv.DictReader(f)}
    return {name: float(table[row]["steps_to_target"]) for name, row in END_TO_END_NAMES.items()
            if row in table and table[row]["steps_to_target"]}


def project(args: argparse.Namespace) -> list[dict]:
    """Every configuration at N = 2…256 on 1–400 Gbit/s, with time to target and GraVAC's CF."""
    cals = calibrations(args.out, args.project_from, args.warmup)
    scale = 1 / host_share(args.project_from, args.cores)  # one uncontended worker per device
    steps_to = load_steps_to_target(args.steps_to_target)
    topk, gains = cals.get(TOPK), {}
    if topk:
        model, batches = workload_batches(args.workload, 4)
        torch.manual_seed(0)
        gains = topk_gains(create_model(model), batches, topk.uncompressed, GRAVAC_LADDER)
    rows = []
    for gbit, ranks in itertools.product(args.bandwidths, args.world_sizes):
        link = cluster_link(gbit, args.step_latency_us * 1e-6, args.round_ms * 1e-3)
        times = {name: predict(cal, link, ranks, scale).step_s for name, cal in cals.items()}
        ladder = {cf: predict(topk, link, ranks, scale, cf=cf).step_s for cf in GRAVAC_LADDER} \
            if topk else {}
        row = {"gbit_per_s": gbit, "ranks": ranks}
        row.update({f"{name} ms": 1e3 * t for name, t in times.items()})
        row.update({f"{name} to target s": steps_to[name] * t for name, t in times.items()
                    if name in steps_to})
        row["GraVAC CF"] = gravac_choice(gains, ladder) if ladder else None
        rows.append(row)
    head = (f"{args.workload} projected from {args.project_from} emulated ranks: compute and "
            f"codec of one uncontended worker (measured / {1 / scale:g}); link: the bandwidth, "
            f"{args.step_latency_us:g} µs per ring message step and {args.round_ms:g} ms per "
            "exchange round (assumed); no "
            "overlap of communication with backward; steps to target measured at 4 ranks "
            f"({args.steps_to_target or 'not given'}), taken as the same at every N; GraVAC's "
            f"CF from TopK gains on the workload's gradients at initialisation "
            f"({', '.join(f'{cf:g}: {g:.2f}' for cf, g in gains.items())}), ε {GRAVAC_EPSILON}")
    write_table(rows, args.out / "projection", head)
    plot_projection(rows, args.world_sizes, args.out / "projection.png", args.workload)
    return rows


# -- the paper's scale -------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperConfig:
    """A configuration at the paper's scale: compressor, CF, the kinds of the collectives it
    starts per fusion bucket (the dense sum of the small tensors first, riding in the
    compressor's own when it sums: what its codec's passes are counted from; its rounds and
    ring message steps are the engine's, :func:`step_traffic`)."""

    spec: str
    cf: float | None
    collectives: tuple[C.Exchange, ...]


def paper_spec(config: PaperConfig) -> str:
    """The configuration as a compression spec (a candidate of a set)."""
    return config.spec if config.cf is None else f"{config.spec}:{config.cf:g}"


_SUM, _GATHER, _SCATTER = C.Exchange.ALLREDUCE, C.Exchange.ALLGATHER, C.Exchange.ALLTOALL
PAPER_CONFIGS = {
    "dense (allreduce)": PaperConfig("none", None, (_SUM,)),
    "TopK 10x (allgather)": PaperConfig("topk", 10.0, (_SUM, _GATHER)),
    "TopK 100x (allgather)": PaperConfig("topk", 100.0, (_SUM, _GATHER)),
    "TopK 1000x (allgather)": PaperConfig("topk", 1000.0, (_SUM, _GATHER)),
    "8-bit (allgather)": PaperConfig("8bit:exchange=allgather", None, (_SUM, _GATHER)),
    "8-bit (two-stage)": PaperConfig("8bit:exchange=two_stage", None, (_SUM, _SCATTER, _GATHER)),
    "PowerSGD rank 1 (allreduce)": PaperConfig("powersgd:1", None, (_SUM, _SUM)),
    "PowerSGD rank 4 (allreduce)": PaperConfig("powersgd:4", None, (_SUM, _SUM)),
}
#: the paper's workloads: model → (its input for one worker's batch, as a meta tensor maker)
PAPER_MODELS: dict[str, Callable[[], torch.Tensor]] = {
    "resnet101": lambda: torch.randn(32, 3, 32, 32),
    "vgg16": lambda: torch.randn(32, 3, 32, 32),
    "lstm1500": lambda: torch.zeros(20, 35, dtype=torch.long),
}


def step_flops(model: str) -> float:
    """Forward + backward FLOPs of one worker's batch (the paper's: 32 images, 20×35 tokens),
    counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        net, x = create_model(model), PAPER_MODELS[model]()
        with FlopCounterMode(display=False) as counter:
            out = net(x)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return float(counter.get_total_flops())


def memcpy_gbps(numel: int = 2**26, repeat: int = 3) -> float:
    """This CPU's copy bandwidth (bytes read + written per second, in GB/s)."""
    from benchmarks.compressors import timed
    x = torch.randn(numel)
    return 2 * 4 * numel / timed(lambda: x.clone(), repeat) / 1e9


def codec_seconds(spec: str, cf: float | None, shapes: Sequence[tuple[str, torch.Size]],
                  uncompressed: frozenset[str], scale: float,
                  repeat: int = 2) -> list[tuple[float, float]]:
    """Per compressed tensor, (encode, decode of one payload) seconds: error feedback +
    compression (all rounds) and one payload's decoding, timed on this CPU, times ``scale``
    (empty for no compression)."""
    from benchmarks.compressors import timed
    compressor = C.create(spec)
    if cf is not None:
        compressor.cf = cf
    if compressor.name == "none":
        return []
    memory = C.create_memory(None, compressor)
    gen = torch.Generator().manual_seed(0)
    times = []
    for name, shape in shapes:
        if name in uncompressed:
            continue
        grad = torch.randn(shape, generator=gen) * 1e-2
        out = torch.empty_like(grad)

        def encode():
            x = memory.compensate(grad, name)
            payload, ctx = compressor.compress(x, name, 0)
            for _ in range(ctx.rounds - 1):
                payload = compressor.next_round(payload, ctx)
            memory.update(name, x, compressor, payload, ctx)
            return payload, ctx
        payload, ctx = encode()
        times.append((scale * timed(encode, repeat), scale * timed(
            lambda: compressor.aggregate([payload], ctx, out=out), repeat)))
    return times


def paper_step(config: PaperConfig, shapes: Sequence[tuple[str, torch.Size]],
               uncompressed: frozenset[str], compute_s: float,
               codec: Sequence[tuple[float, float]], link: Link, world_size: int,
               floor_s: float = 0.0) -> Prediction:
    """A step of ``config`` at the paper's scale: compute; codec from each tensor's (encode,
    decode one payload) times, each pass at least ``floor_s`` (kernel launches): an allgather
    decodes its N payloads in one pass (N× the elements), two stages decode twice and
    compress the owned chunk again; and the wait of ``config``'s rounds and collectives per
    fusion bucket."""
    n = world_size
    compressor = C.create(config.spec)
    if config.cf is not None:
        compressor.cf = config.cf
    traffic = step_traffic(shapes, compressor, uncompressed, config.cf, n)

    def passes(encode: float, decode: float) -> tuple[float, ...]:
        if _SCATTER in config.collectives:  # the owner decodes N chunks, compresses its own
            return encode, decode, encode / n, decode
        if _GATHER in config.collectives:
            return encode, n * decode
        return encode, decode
    codec_s = sum(max(t, floor_s) for e, d in codec for t in passes(e, d))
    return Prediction(compute_s, codec_s, link.wait_for(traffic))


def paper(args: argparse.Namespace) -> list[dict]:
    """The paper's workloads at 32 workers on 10/25/100 Gbit/s, the N where allgather TopK
    stops paying, and GraVAC's pick."""
    from horovod_gravac.app import data
    torch.set_num_threads(1)  # the codec and memcpy timings alike: one core of this CPU
    cpu_gbps = memcpy_gbps()
    scale = cpu_gbps / args.gpu_memory_gbps
    floor = args.kernel_floor_us * 1e-6
    rows, crossings, assumptions, choices = [], [], [], []
    curves: dict[tuple[str, float], dict[str, list[float]]] = {}
    for model in args.paper_models:
        shapes = parameter_shapes(model)
        uncompressed = C.uncompressed_tensors(((n, s.numel()) for n, s in shapes),
                                              C.DEFAULT_MIN_COMPRESS_NUMEL)
        flops = step_flops(model)
        compute = flops / (args.gpu_tflops * 1e12)
        ladder_codec = {cf: codec_seconds("topk", cf, shapes, uncompressed, scale)
                        for cf in GRAVAC_LADDER}
        # two stages are timed as their quantizer's codec (paper_step adds the second stage)
        codecs = {name: ladder_codec[c.cf] if c.spec == "topk" and c.cf in ladder_codec else
                  codec_seconds(c.spec.replace("two_stage", "allgather"), c.cf, shapes,
                                uncompressed, scale)
                  for name, c in PAPER_CONFIGS.items()}
        torch.manual_seed(0)
        net = create_model(model)
        if model.startswith("lstm"):
            tokens = data.PTBCorpus().train
            batches = [lambda m: lm_loss(m, tokens, 0)]
        else:
            classes = 100 if model == "vgg16" else 10
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(classes, (32,),
                                                                            generator=gen)
            batches = [lambda m: torch.nn.functional.cross_entropy(m(x), y)]
        gains = topk_gains(net, batches, uncompressed, GRAVAC_LADDER)
        candidates = C.create("|".join(paper_spec(c) for c in PAPER_CONFIGS.values()))
        choice_gains = dict(zip(PAPER_CONFIGS, codec_gains(net, batches, uncompressed,
                                                           candidates)))
        del net
        assumptions.append(
            f"{model}: {sum(s.numel() for _, s in shapes) / 1e6:.1f}M parameters, "
            f"{flops / 1e9:.0f} GFLOP per step → compute {1e3 * compute:.1f} ms at "
            f"{args.gpu_tflops:g} TFLOPS; TopK gains at initialisation "
            + ", ".join(f"{cf:g}: {g:.2f}" for cf, g in gains.items())
            + "; CodecChoice's gains " + ", ".join(f"{n}: {g:.2f}"
                                                    for n, g in choice_gains.items()))
        for gbit in args.paper_bandwidths:
            link = cluster_link(gbit, args.step_latency_us * 1e-6, args.round_ms * 1e-3)

            def step(name: str, ranks: int) -> Prediction:
                return paper_step(PAPER_CONFIGS[name], shapes, uncompressed, compute,
                                  codecs[name], link, ranks, floor)
            def pick_at(ranks: int) -> str:
                """GraVAC's cost model's CF for TopK on ``ranks`` workers."""
                return gravac_choice(gains, {cf: paper_step(
                    PaperConfig("topk", cf, (_SUM, _GATHER)), shapes, uncompressed, compute,
                    ladder_codec[cf], link, ranks, floor).step_s for cf in GRAVAC_LADDER})
            at = {name: step(name, args.paper_ranks) for name in PAPER_CONFIGS}
            pick = pick_at(args.paper_ranks)
            chosen = codec_choice(choice_gains, {n: p.step_s for n, p in at.items()})
            admissible = [n for n in PAPER_CONFIGS if choice_gains[n] >= GRAVAC_EPSILON]
            fastest = min(admissible, key=lambda n: at[n].step_s)
            choices.append({"model": model, "gbit_per_s": gbit, "ranks": args.paper_ranks,
                            "choice": chosen, "gain": choice_gains[chosen],
                            "step_ms": 1e3 * at[chosen].step_s,
                            "vs_dense": at[DENSE].step_s / at[chosen].step_s,
                            "fastest_admissible": fastest,
                            "vs_fastest": at[fastest].step_s / at[chosen].step_s})
            curves[(model, gbit)] = {name: [step(name, n).step_s for n in WORLD_SIZES]
                                     for name in PAPER_CONFIGS}
            for name, p in at.items():
                rows.append({"model": model, "gbit_per_s": gbit, "ranks": args.paper_ranks,
                             "config": name, "step_ms": 1e3 * p.step_s,
                             "compute_ms": 1e3 * p.compute_s, "codec_ms": 1e3 * p.codec_s,
                             "wait_ms": 1e3 * p.wait_s,
                             "vs_dense": at[DENSE].step_s / p.step_s, "gravac_cf": pick})
            for name in ("TopK 10x (allgather)", "TopK 100x (allgather)",
                         "TopK 1000x (allgather)", "8-bit (allgather)"):
                stops = next((n for n in range(2, 257)
                              if step(name, n).step_s >= step(DENSE, n).step_s), None)
                crossings.append({"model": model, "gbit_per_s": gbit, "config": name,
                                  "stops_paying_at": stops,
                                  "GraVAC CF there": pick_at(stops) if stops else None})
    head = (f"{args.paper_ranks} workers; assumed: compute = counted FLOPs / "
            f"{args.gpu_tflops:g} TFLOPS sustained; codec = this CPU's time × {scale:.3f} (its "
            f"memcpy {cpu_gbps:.1f} GB/s over {args.gpu_memory_gbps:g} GB/s), at least "
            f"{args.kernel_floor_us:g} µs per tensor and pass; link: the bandwidth per worker, "
            f"{args.step_latency_us:g} µs per ring message step, {args.round_ms:g} ms per "
            "exchange round, the rounds of every 25 MB bucket one after another (no overlap "
            "with backward)")
    write_table(rows, args.paper_out / "paper", head + "\n\n" + "\n".join(
        f"- {a}" for a in assumptions))
    write_table(choices, args.paper_out / "paper_choice",
                f"the configuration CodecChoice sends at {args.paper_ranks} workers (the best "
                f"gain / predicted step among those with a gain ≥ ε = {GRAVAC_EPSILON}), its "
                "step against dense and against the fastest admissible configuration")
    write_table(crossings, args.paper_out / "paper_crossover",
                "smallest N (2…256) at which the configuration's step is no faster than dense "
                "ring allreduce (— : it pays up to 256)")
    plot_curves(curves, WORLD_SIZES, args.paper_out / "paper.png",
                "step time at the paper's scale (assumptions in paper.md)")
    return rows


# -- output ------------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_table(rows: list[dict], stem: Path, head: str) -> None:
    """``stem``.csv and ``stem``.md (``head`` above the table), and the table on stdout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [head, "", "| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in r.values()) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_validation(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    for name in CONFIGS:
        sub = [r for r in rows if r["config"] == name]
        if sub:
            ax.scatter([r["measured_step_ms"] for r in sub], [r["predicted_step_ms"] for r in sub],
                       label=name)
            for r in sub:
                ax.annotate(f"{r['ranks']}", (r["measured_step_ms"], r["predicted_step_ms"]),
                            fontsize=7)
    top = max(max(r["measured_step_ms"], r["predicted_step_ms"]) for r in rows) * 1.1
    ax.plot([0, top], [0, top], "k-", lw=0.8)
    for f in (0.85, 1.15):
        ax.plot([0, top], [0, f * top], "k:", lw=0.8)
    ax.set_xlabel("measured median step (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.set_title("what-if model vs emulated runs (labels: ranks; dotted: ±15%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_projection(rows: list[dict], world_sizes: Sequence[int], path: Path,
                    workload: str) -> None:
    curves: dict[tuple[str, float], dict[str, list[float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key.endswith(" ms"):
                curves.setdefault((workload, r["gbit_per_s"]), {}).setdefault(
                    key[:-3], []).append(value / 1e3)
    plot_curves(curves, world_sizes, path, f"{workload}: predicted step time")


def plot_curves(curves: Mapping[tuple[str, float], Mapping[str, list[float]]],
                world_sizes: Sequence[int], path: Path, title: str) -> None:
    """One panel per (model, bandwidth): step time against the number of workers."""
    plt = _pyplot()
    models = list(dict.fromkeys(m for m, _ in curves))
    rates = list(dict.fromkeys(g for _, g in curves))
    fig, axes = plt.subplots(len(models), len(rates), figsize=(3.6 * len(rates),
                                                               3.2 * len(models)),
                             squeeze=False, sharex=True)
    for (i, model), (j, gbit) in itertools.product(enumerate(models), enumerate(rates)):
        ax = axes[i][j]
        for name, times in curves.get((model, gbit), {}).items():
            ax.plot(world_sizes, [1e3 * t for t in times], marker=".", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{model}, {gbit:g} Gbit/s", fontsize=9)
        ax.set_xlabel("workers")
        ax.set_ylabel("step (ms)")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _numbers(text: str, flag: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{flag} must list numbers > 0, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="digits", choices=sorted(WORKLOADS))
    p.add_argument("--measure", action="store_true", help="run the emulated runs (root)")
    p.add_argument("--validate", action="store_true", help="predicted vs measured steps")
    p.add_argument("--project", action="store_true", help="N = 2…256 on 1–400 Gbit/s")
    p.add_argument("--paper", action="store_true", help="the paper's models at 32 workers")
    p.add_argument("--ranks", default="2,4,8", help="world sizes to measure")
    p.add_argument("--calibrate-at", type=int, default=4,
                   help="ranks of the calibration runs that --validate predicts the others from")
    p.add_argument("--project-from", type=int, default=None,
                   help="ranks of the runs --project starts from (default: this machine's "
                        "cores, the most ranks that each have a core: no sharing to undo)")
    p.add_argument("--steps", type=int, default=60, help="steps of a measured run")
    p.add_argument("--warmup", type=int, default=10, help="first steps of a run left out")
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--delay", default="1ms")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="cores the emulated ranks share (default: this machine's)")
    p.add_argument("--world-sizes", default=",".join(map(str, WORLD_SIZES)))
    p.add_argument("--bandwidths", default=",".join(map(str, BANDWIDTHS_GBIT)),
                   help="Gbit/s per worker for --project")
    p.add_argument("--emulated-step-latency-us", type=float, default=0.0,
                   help="latency of a ring message step on the emulated links (0: this "
                        "machine's kernel has no netem, launch/netem.py shapes the rate only)")
    p.add_argument("--step-latency-us", type=float, default=10.0,
                   help="assumed latency of one ring message step on a cluster")
    p.add_argument("--steps-to-target", type=Path, default=None,
                   help="an end-to-end CSV with the workload's steps to target")
    p.add_argument("--paper-models", default=",".join(PAPER_MODELS))
    p.add_argument("--paper-ranks", type=int, default=32)
    p.add_argument("--paper-bandwidths", default="10,25,100")
    p.add_argument("--gpu-tflops", type=float, default=6.3,
                   help="sustained GPU throughput (default: 40%% of a V100's 15.7 FP32 TFLOPS)")
    p.add_argument("--gpu-memory-gbps", type=float, default=900.0,
                   help="GPU memory bandwidth (a V100's HBM2: 900 GB/s)")
    p.add_argument("--kernel-floor-us", type=float, default=20.0,
                   help="least GPU time of a tensor's compression or decoding (kernel launches)")
    p.add_argument("--round-ms", type=float, default=0.1,
                   help="assumed fixed cost of an exchange round on a cluster (Horovod's "
                        "negotiation, launching the collectives)")
    p.add_argument("--out", type=Path, default=None, help="default: results/whatif/<workload>")
    p.add_argument("--paper-out", type=Path, default=Path("results/whatif/paper"))
    args = p.parse_args(argv)
    args.ranks = _numbers(args.ranks, "--ranks", int)
    args.world_sizes = _numbers(args.world_sizes, "--world-sizes", int)
    args.bandwidths = _numbers(args.bandwidths, "--bandwidths", float)
    args.paper_bandwidths = _numbers(args.paper_bandwidths, "--paper-bandwidths", float)
    args.configs = args.configs.split(",")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"--configs: unknown {unknown}; valid: {list(CONFIGS)}")
    args.paper_models = args.paper_models.split(",")
    unknown = [m for m in args.paper_models if m not in PAPER_MODELS]
    if unknown:
        raise ValueError(f"--paper-models: unknown {unknown}; valid: {list(PAPER_MODELS)}")
    args.project_from = args.project_from or max(2, args.cores)
    for flag in ("calibrate_at", "project_from", "paper_ranks"):
        if getattr(args, flag) < 2:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 2, got {getattr(args, flag)}")
    for flag in ("steps", "cores"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.warmup < args.steps:
        raise ValueError(f"--warmup must be in [0, --steps), got {args.warmup}")
    for flag in ("step_latency_us", "emulated_step_latency_us", "kernel_floor_us", "round_ms"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    for flag in ("gpu_tflops", "gpu_memory_gbps"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if not (args.measure or args.validate or args.project or args.paper):
        raise ValueError("nothing to do: give --measure, --validate, --project and/or --paper")
    args.out = args.out or Path("results/whatif") / args.workload
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure:
        measure(args)
    if args.validate:
        validate(args)
    if args.project:
        project(args)
    if args.paper:
        paper(args)


if __name__ == "__main__":
    main()

"""The training application: the paper's workloads on Horovod with compression and agents.

Run it under a Horovod launcher; every rank trains on its own shard of the data:

    horovodrun -np 2 -H localhost:2 --gloo gravac-train --model lstm200 --data ptb \\
        --compression topk --agent gravac --theta-min 10 --theta-max 1000 --steps 300

Writes to ``--out``: ``steps.csv`` (per step: loss, samples/s, CF, gains, bytes),
``evals.csv`` (per evaluation: quality vs wall time and bytes), ``summary.json``, and
TensorBoard events; ``gravac-plot`` turns run directories into PNGs.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

WORKLOADS = {  # data → (task, models that fit, classes or None)
    "ptb": ("lm", ("lstm200", "lstm650", "lstm1500", "gpt4x256"), None),
    "cifar10": ("image", ("resnet20", "resnet101", "vgg_small", "vgg16"), 10),
    "cifar100": ("image", ("resnet20", "resnet101", "vgg_small", "vgg16"), 100),
    "digits": ("image", ("mlp", "cnn_digits"), 10),
}
METRICS = {"lm": ("perplexity",), "image": ("accuracy", "top5")}
#: ``--help``'s line for each model of ``app.models.MODELS`` and each data set of WORKLOADS
MODEL_HELP = {
    "mlp": "MLP 64-128-128-10 (26k parameters)",
    "cnn_digits": "small CNN (0.28M parameters): the CNN workload that runs offline",
    "resnet20": "CIFAR ResNet-20 (0.27M), sized for CPUs",
    "resnet101": "bottleneck ResNet-101 with a CIFAR stem (42.5M), the paper's",
    "vgg_small": "small VGG (1.3M), sized for CPUs",
    "vgg16": "VGG16 (134.7M), the paper's",
    "lstm200": "2x200 LSTM language model (4.7M), sized for CPUs",
    "lstm650": "2x650 LSTM language model (19.8M)",
    "lstm1500": "2x1500 LSTM language model (66.0M), the paper's",
    "gpt4x256": "GPT-2-style decoder: 4 blocks, width 256, 4 heads, context 64 (5.7M)",
}
DATA_HELP = {
    "ptb": "Penn Treebank, word level (perplexity; found or downloaded, see --data-dir)",
    "cifar10": "CIFAR-10 (accuracy, top5; downloaded into --data-dir unless --no-download)",
    "cifar100": "CIFAR-100 (accuracy, top5; downloaded like CIFAR-10)",
    "digits": "scikit-learn's 8x8 digits (accuracy, top5; no download)",
}
BASELINES = ("horovod", "horovod-fp16", "ddp-powersgd")
#: GraVAC's metrics row → steps.csv: time blocked on collectives, link bytes, and with
#: ``--search cost_model`` the fitted link (bytes/s, seconds per step), mean compute and the
#: predicted step time of the CF chosen
LINK_COLUMNS = ("wait_s", "link_bytes", "link_bandwidth", "link_latency", "compute_s",
                "predicted_step_s")


def _one_line(doc: str | None) -> str:
    """A docstring's first paragraph on one line, as plain text (``code`` as `code`)."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    text = re.sub(r":\w+:`~?([^`]*)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "`")


def choices_epilog() -> str:
    """``--help``'s end: every model, data set, compressor and agent, one line each, from
    the registries."""
    from .. import agents as A
    from .. import compression as C
    from .models import MODELS

    def block(title: str, rows: list[tuple[str, str]]) -> list[str]:
        width = max(len(name) for name, _ in rows) + 2
        return ["", title] + [f"  {name:<{width}}{text}" for name, text in rows]

    fits = {m: ",".join(d for d, (_, models, _) in WORKLOADS.items() if m in models)
            for m in MODELS}
    width = max(map(len, fits.values())) + 2
    agents = [("none", "no agent: the compressor's own setting at every step")]
    agents += [(name, _one_line(sys.modules[cls.__module__].__doc__))
               for name, cls in A.AGENTS.items()]
    lines = (block("models (--model; the data sets each fits):",
                   [(m, f"{fits[m]:<{width}}{MODEL_HELP[m]}") for m in MODELS])
             + block("data sets (--data):", list(DATA_HELP.items()))
             + block("compressors (--compression NAME[:VALUE]):",
                     [(name, _one_line(cls.__doc__)) for name, cls in C.COMPRESSORS.items()])
             + block("agents (--agent):", agents))
    return "\n".join(lines[1:])


class _Parser(argparse.ArgumentParser):
    """``--help`` ends with :func:`choices_epilog`, built only then (it imports torch)."""

    def format_help(self) -> str:
        self.epilog = self.epilog or choices_epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gravac-train", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON or YAML file of flags ({\"model\": \"lstm200\", \"steps\": 300, "
                        "...}; a run's own config.json repeats it); command-line flags override it")
    for add in (_workload_arguments, _exchange_arguments, _agent_arguments,
                _plan_and_accordion_arguments, _adam_arguments, _output_arguments):
        add(p)
    return p


def _workload_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the data and the optimizer."""
    g = p.add_argument_group("workload")
    g.add_argument("--model", default="lstm200", help="one of the models listed below")
    g.add_argument("--data", default="ptb", choices=sorted(WORKLOADS))
    g.add_argument("--data-dir", default=None, help="PTB or CIFAR directory (PTB: ../shared/data/ptb)")
    g.add_argument("--no-download", action="store_true", help="never download CIFAR")
    g.add_argument("--torchvision", action="store_true", help="torchvision's ResNet/VGG")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    g.add_argument("--batch-size", type=int, default=None, help="per rank (paper: 32 CNN, 20 LSTM)")
    g.add_argument("--bptt", type=int, default=None,
                   help="tokens per window (default: 35 for an LSTM, a Transformer's context)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd (with --momentum) or adamw (betas 0.9, 0.999)")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--adam-eps", type=float, default=1e-8,
                   help="AdamW's eps (raise it, e.g. 1e-6, under high CFs: examples/adam.py)")
    g.add_argument("--lr-schedule", choices=("step", "cosine"), default="step",
                   help="step: × --lr-decay-factor at each of --lr-decay-steps; cosine: to 0 "
                        "at the last step")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="linear learning-rate warm-up over the first steps (both schedules)")
    g.add_argument("--lr-decay-steps", default="", help="comma-separated steps, e.g. 9000,14000")
    g.add_argument("--lr-decay-factor", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=None, help="gradient norm clipping (LSTM: 0.25)")


def _exchange_arguments(p: argparse.ArgumentParser) -> None:
    """How gradients travel: a baseline, or this library's compression."""
    g = p.add_argument_group("communication")
    g.add_argument("--baseline", choices=BASELINES, default=None,
                   help="use hvd.DistributedOptimizer (dense or fp16), or PyTorch DDP with its "
                        "PowerSGD communication hook (Gloo), instead of this library")
    g.add_argument("--ddp", action="store_true",
                   help="exchange through PyTorch DDP with this library's communication hook "
                        "(horovod_gravac.ddp: the same --compression/--agent/--memory flags) "
                        "instead of the Horovod optimizer; Horovod still launches the ranks")
    g.add_argument("--powersgd-rank", type=int, default=1, help="ddp-powersgd's matrix rank")
    g.add_argument("--powersgd-start", type=int, default=2,
                   help="ddp-powersgd: dense allreduce before this step (>= 2)")
    g.add_argument("--compression", default="none",
                   help="name[:value], e.g. topk:100 (the compressors are listed below); "
                        "for --agent choice a set, 'dense|fp16|powersgd:1|topk:100', or auto "
                        "(dense|fp16|powersgd:1|powersgd:4|topk:100|topk:1000)")
    g.add_argument("--value-dtype", default=None, choices=("float16", "bfloat16"),
                   help="topk/dgc: send the kept values in this dtype (default: the gradient's)")
    g.add_argument("--memory", default=None, help="error-feedback memory (default: the compressor's)")
    g.add_argument("--granularity", default="layer", choices=("layer", "model"))
    g.add_argument("--bucket-cap-mb", type=float, default=None,
                   help="gradient megabytes whose payloads travel in one fused collective "
                        "(default: the library's)")
    g.add_argument("--min-compress-numel", type=int, default=None,
                   help="gradients with fewer elements are sent uncompressed (default: the "
                        "library's; 0 compresses all)")
    g.add_argument("--compress-pattern", action="append", default=None, metavar="PATTERN=BOOL",
                   help="parameter names matching PATTERN (fnmatch) are always (true) or never "
                        "(false) compressed, e.g. '*.bias=false'; repeatable, first match wins")
    g.add_argument("--on-nonfinite", choices=("skip", "raise"), default=None,
                   help="a NaN/Inf gradient: skip the step on every rank, or stop")


def _agent_arguments(p: argparse.ArgumentParser) -> None:
    """The agent that sets the CF, and its parameters."""
    g = p.add_argument_group("agents")
    g.add_argument("--agent", default="none",
                   choices=("none", "static", "gravac", "accordion", "choice"),
                   help="choice: the codec among --compression's candidates (auto, or "
                        "'dense|fp16|powersgd:1|topk:100'), every --window steps")
    g.add_argument("--cf", type=float, default=None, help="static agent's CF")
    g.add_argument("--theta-min", type=float, default=10.0)
    g.add_argument("--theta-max", type=float, default=1000.0)
    g.add_argument("--epsilon", type=float, default=0.7)
    g.add_argument("--omega", type=float, default=0.05, help="GraVAC's gain-gap tolerance")
    g.add_argument("--omega-throughput", type=float, default=0.05,
                   help="GraVAC's throughput-saturation tolerance")
    g.add_argument("--window", type=int, default=None,
                   help="GraVAC's window (default: a tenth of the run, at least 10 steps)")
    g.add_argument("--gain", default="fresh", choices=("fresh", "error_fed", "authors"),
                   help="GraVAC's compression-gain definition")
    g.add_argument("--gain-interval", type=int, default=None,
                   help="measure the gain every k steps (default: every step)")
    g.add_argument("--settle-steps", type=int, default=None,
                   help="steps after a change that are not timed (GraVAC's: 3, nor measured; "
                        "CodecChoice's: 1)")
    g.add_argument("--reopen-tolerance", type=float, default=0.1,
                   help="GraVAC: reopen the search when the settled CF's gain drifts by this "
                        "much (relative) for two windows; 0 never")
    g.add_argument("--reopen-lr-ratio", type=float, default=2.0,
                   help="GraVAC: reopen the search when the learning rate changed by this "
                        "factor since it settled; 0 never")
    g.add_argument("--search", default="cost_model", choices=("cost_model", "throughput"),
                   help="GraVAC: every CF ranked by gain / step time predicted from a fitted "
                        "link model (default), or a window per candidate CF ranked by measured "
                        "compression throughput (the paper's)")
    g.add_argument("--gain-sample", type=int, default=16384,
                   help="GraVAC: elements per tensor each gain is estimated from; 0 measures "
                        "it exactly (a second compression of every gradient, the paper's)")


def _plan_and_accordion_arguments(p: argparse.ArgumentParser) -> None:
    """The layer plan over an agent, GraVAC's paper search and Accordion."""
    g = p.add_argument_group("agents: the layer plan, the paper's search, Accordion")
    g.add_argument("--layer-plan", action="store_true",
                   help="under the agent's uniform CF, a CF per tensor that minimises the bytes "
                        "within the uniform CF's total compression error (re-planned every "
                        "--plan-interval steps; not with Accordion's per-layer norms); under "
                        "--agent choice, a codec per tensor among --compression's candidates")
    g.add_argument("--plan-alpha", type=float, default=1.0,
                   help="layer plan: error budget relative to the uniform CF's total error")
    g.add_argument("--plan-interval", type=int, default=None,
                   help="layer plan: steps between plans (default: a tenth of the run, at "
                        "least 10 steps)")
    g.add_argument("--plan-factors", default=None,
                   help="layer plan: candidate CFs per tensor as factors of the uniform CF, "
                        "comma-separated, with 1 among them (default: the library's, "
                        "0.25,0.5,1,2,4,8)")
    g.add_argument("--plan-measure-steps", type=int, default=3,
                   help="layer plan: steps at each interval's end whose errors are measured")
    g.add_argument("--theta-s", type=float, default=2.0)
    g.add_argument("--policy", default="exponential", choices=("exponential", "geometric"))
    g.add_argument("--ewma", type=float, default=None,
                   help="default: min(1, max(number of ranks / 100, 5 * gain interval / window))")
    g.add_argument("--low-cf", type=float, default=1.0)
    g.add_argument("--high-cf", type=float, default=10.0)
    g.add_argument("--interval", type=int, default=10, help="Accordion's interval")
    g.add_argument("--interval-unit", choices=("steps", "epochs"), default="epochs")
    g.add_argument("--eta", type=float, default=0.5)
    g.add_argument("--whole-model-norms", action="store_true", help="Accordion on the model norm")


def _adam_arguments(p: argparse.ArgumentParser) -> None:
    """The Adam-family exchange (horovod_gravac.adam)."""
    g = p.add_argument_group("Adam-family exchange")
    g.add_argument("--adam-exchange", choices=("auto", "on", "off"), default="auto",
                   help="Adam-family exchange (horovod_gravac.adam): dense AdamW until its second "
                        "moment settles, then frozen, and the preconditioned gradient exchanged "
                        "compressed. auto: with --optimizer adamw and a compressor beyond fp16; "
                        "off: compress AdamW's gradients instead (the earlier behaviour)")
    g.add_argument("--adam-warmup", type=int, default=20,
                   help="Adam-family exchange: dense steps at least before the variance freezes")
    g.add_argument("--adam-tolerance", type=float, default=0.05,
                   help="Adam-family exchange: freeze once sqrt(v) changed by at most this much "
                        "(relative, L1) over a check interval")
    g.add_argument("--adam-check-interval", type=int, default=10,
                   help="Adam-family exchange: steps between measurements of that change")
    g.add_argument("--adam-max-warmup", type=int, default=None,
                   help="Adam-family exchange: freeze after this many steps at the latest")
    g.add_argument("--adam-sends", choices=("gradient", "momentum"), default="gradient",
                   help="Adam-family exchange, once frozen: compress each rank's "
                        "preconditioned gradient, the momentum taken after the average, or "
                        "its preconditioned momentum (1-bit Adam's)")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    """Checkpoints, evaluation and output."""
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint", default=None, help="checkpoint file (written by rank 0)")
    g.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (default: only at the end)")
    g.add_argument("--resume", action="store_true", help="start from --checkpoint")
    g.add_argument("--resume-convert", action="store_true",
                   help="resume a checkpoint of another world size or compressor: keep the "
                        "model, restart error feedback")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--target-metric", default=None, help="accuracy, top5 or perplexity")
    g.add_argument("--target", type=float, default=None)
    g.add_argument("--stop-at-target", action="store_true")
    g.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations")
    g.add_argument("--eval-batches", type=int, default=None, help="limit evaluation batches")
    g.add_argument("--out", default="runs/latest")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--no-progress", action="store_true")

def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags a config file may set (every option but --config and --help), by dest."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in ("config", "help")}


def config_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The flags a ``--config`` file sets, as command-line tokens (so argparse checks types
    and choices exactly as for typed flags). Keys are flag names (``lr-decay-steps`` or
    ``lr_decay_steps``); ``null`` and ``false`` leave a flag at its default."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config: no file {path!r}")
    text = file.read_text()
    if file.suffix.lower() in (".yaml", ".yml"):
        import yaml
        values = yaml.safe_load(text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path!r} is not valid JSON ({exc}); YAML files must "
                             "end in .yaml or .yml") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of flag names to values")
    actions = flag_actions(parser)
    argv = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise ValueError(f"--config {path!r}: unknown flag {key!r}; valid flags: "
                             f"{', '.join(sorted(actions))}")
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError(f"--config {path!r}: {key!r} is a switch: true or false, "
                                 f"got {value!r}")
            argv += [flag] if value else []
        elif value is None:
            continue
        elif isinstance(action, argparse._AppendAction):  # a list: the flag once per item
            for item in value if isinstance(value, list) else [value]:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags from ``--config`` (if given), then the command line, which overrides it;
    checked by :func:`validate`. A mistake exits with ``gravac-train: error: ...`` (2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.config:
            cli = sys.argv[1:] if argv is None else list(argv)
            args = parser.parse_args(config_argv(parser, args.config) + cli)
        validate(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    return args


def flags(args: argparse.Namespace) -> dict[str, Any]:
    """The run's flags (what ``--config`` reads back), without derived values."""
    dests = flag_actions(build_parser())
    return {k: v for k, v in vars(args).items() if k in dests}


def validate(args: argparse.Namespace) -> None:
    """Every flag checked before Horovod starts: errors name the flag, value and range. It
    completes ``args`` too: defaults that depend on other flags, and the objects the flags
    describe (``compress_patterns``) and the library's defaults the run uses."""
    task = _check_workload(args)
    _check_run(args, task)
    _check_exchange(args)


def _check_workload(args: argparse.Namespace) -> str:
    """The model, data and optimizer flags; returns the task (``"lm"`` or ``"image"``)."""
    task, models, _ = WORKLOADS[args.data]
    if args.model not in models:
        raise ValueError(f"--model {args.model!r} does not fit --data {args.data!r}; "
                         f"use one of {', '.join(models)}")
    for flag, value, low in (("--epochs", args.epochs, 0), ("--lr", args.lr, 0),
                             ("--lr-decay-factor", args.lr_decay_factor, 0)):
        if not value > low:
            raise ValueError(f"{flag} must be > {low}, got {value!r}")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--bptt", args.bptt), ("--eval-interval", args.eval_interval),
                        ("--threads", args.threads), ("--eval-batches", args.eval_batches),
                        ("--checkpoint-every", args.checkpoint_every),
                        ("--powersgd-rank", args.powersgd_rank)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value!r}")
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum!r}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay!r}")
    if not args.adam_eps > 0:
        raise ValueError(f"--adam-eps must be > 0, got {args.adam_eps!r}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps!r}")
    if task == "lm":
        from .models import model_context
        context = model_context(args.model)
        if args.bptt is None:
            args.bptt = context or 35
        elif context is not None and args.bptt > context:
            raise ValueError(f"--bptt {args.bptt} is longer than --model {args.model}'s context "
                             f"of {context} tokens; use at most {context}")
    if args.clip is not None and not args.clip > 0:
        raise ValueError(f"--clip must be > 0, got {args.clip!r}")
    args.decay_steps = parse_steps(args.lr_decay_steps)
    if args.decay_steps and args.lr_schedule == "cosine":
        raise ValueError("--lr-decay-steps applies to --lr-schedule step, not cosine")
    return task


def _check_run(args: argparse.Namespace, task: str) -> None:
    """Targets, checkpoints, and which front-end runs."""
    if args.target_metric is not None and args.target_metric not in METRICS[task]:
        raise ValueError(f"--target-metric {args.target_metric!r} does not apply to --data "
                         f"{args.data!r}; use one of {', '.join(METRICS[task])}")
    if args.target is not None and args.target_metric is None:
        args.target_metric = METRICS[task][0]
    if args.stop_at_target and args.target is None:
        raise ValueError("--stop-at-target needs --target")
    if (args.resume or args.resume_convert or args.checkpoint_every) and not args.checkpoint:
        raise ValueError("--resume, --resume-convert and --checkpoint-every need --checkpoint PATH")
    if args.resume_convert:
        args.resume = True
    if args.powersgd_start < 2:
        raise ValueError(f"--powersgd-start must be >= 2 (PyTorch's PowerSGD with error feedback), "
                         f"got {args.powersgd_start}")
    if args.resume and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {args.checkpoint}; run once with "
                                "--checkpoint to write one, or drop --resume")
    if args.ddp and (args.baseline or args.checkpoint or args.granularity != "layer"):
        raise ValueError("--ddp takes no --baseline, --checkpoint or --granularity model (the "
                         "DDP hook compresses layer by layer; save its state with torch.save)")
    if args.baseline and (args.agent != "none" or args.compression != "none"):
        raise ValueError("--baseline runs hvd.DistributedOptimizer: it takes no --agent or "
                         "--compression")


def _check_exchange(args: argparse.Namespace) -> None:
    """The compression, the agent and the Adam-family exchange, built once to check them."""
    from horovod_gravac import compression
    args.compress_patterns = parse_patterns(args.compress_pattern)
    if args.gain_sample < 0:
        raise ValueError(f"--gain-sample must be >= 0 (0: exact), got {args.gain_sample!r}")
    if args.layer_plan and args.agent == "none":
        raise ValueError("--layer-plan redistributes an agent's CF (or codec): give --agent "
                         "static, gravac, accordion or choice")
    if args.layer_plan and args.agent == "accordion" and not args.whole_model_norms:
        raise ValueError("--layer-plan plans the tensors' CFs itself: give Accordion "
                         "--whole-model-norms (one CF for the model)")
    if args.layer_plan and args.agent == "choice" and args.plan_factors is not None:
        raise ValueError(f"--plan-factors {args.plan_factors}: under --agent choice the plan "
                         "chooses each tensor's codec among --compression's candidates, not "
                         "a CF: leave --plan-factors out")
    try:
        if args.plan_factors is not None:
            args.plan_factors = tuple(float(f) for f in str(args.plan_factors).split(","))
    except ValueError:
        raise ValueError("--plan-factors must be comma-separated numbers like 0.5,1,2, got "
                         f"{args.plan_factors!r}") from None
    try:  # bad names and values fail here, named as the flags they came from
        settings = exchange_settings(args, make_agent(args))
    except ValueError as exc:
        raise ValueError(re.sub(r"^(bucket_cap_mb|min_compress_numel|on_nonfinite)\b",
                                lambda m: "--" + m.group(1).replace("_", "-"), str(exc))) from None
    # the values the run uses, as its config.json records them
    args.bucket_cap_mb, args.min_compress_numel, args.on_nonfinite = \
        settings.bucket_cap_mb, settings.min_compress_numel, settings.on_nonfinite
    if not args.torchvision and not args.baseline:  # names known without building the model
        from .models import parameter_shapes
        compression.uncompressed_tensors(((n, s.numel()) for n, s in parameter_shapes(args.model)),
                                         settings.min_compress_numel, settings.compress_patterns)


def exchange_settings(args: argparse.Namespace, agent: Any) -> Any:
    """The library's :class:`~horovod_gravac.settings.Settings` of the run, with ``agent`` (built for
    the run's length)."""
    from horovod_gravac import compression
    from horovod_gravac.settings import Settings
    adam_family = args.optimizer == "adamw" and args.adam_exchange != "off" and \
        not args.baseline
    compressor = compression.create(compression.for_optimizer(args.compression, adam_family),
                                    **compression_params(args))
    return Settings.of(compression=compressor, memory=args.memory, agent=agent,
                       compress_patterns=args.compress_patterns,
                       adam_exchange=make_adam_exchange(args, compressor) or "off",
                       on_nonfinite=args.on_nonfinite,  # None: the library's default
                       min_compress_numel=args.min_compress_numel,
                       bucket_cap_mb=args.bucket_cap_mb)


def make_adam_exchange(args: argparse.Namespace, compressor) -> Any:
    """The Adam-family exchange of the run (an ``AdamExchange``), or None: gradients."""
    from horovod_gravac.adam import AdamExchange
    exchange = AdamExchange(args.adam_warmup, args.adam_tolerance, args.adam_check_interval,
                            args.adam_max_warmup, args.adam_sends)  # bad values fail here
    if args.adam_exchange == "on" and args.optimizer != "adamw":
        raise ValueError(f"--adam-exchange on needs --optimizer adamw, got --optimizer "
                         f"{args.optimizer}")
    wanted = args.adam_exchange == "on" or (args.adam_exchange == "auto" and
                                            args.optimizer == "adamw" and not args.baseline and
                                            not compressor.preserves_adam)
    if not wanted:
        return None
    if args.clip is not None:
        raise ValueError("--clip clips the averaged gradient, which the Adam-family exchange "
                         "does not form once the variance is frozen (p.grad then holds the "
                         "exchanged update): drop --clip or give --adam-exchange off")
    return exchange


def parse_patterns(items: list[str] | None) -> dict[str, bool]:
    """``["*.bias=false", "decoder.*=true"]`` → ``{"*.bias": False, "decoder.*": True}``."""
    patterns = {}
    for item in items or []:
        pattern, eq, value = item.rpartition("=")
        if not eq or not pattern or value.strip().lower() not in ("true", "false"):
            raise ValueError(f"--compress-pattern must be PATTERN=true or PATTERN=false, got {item!r}")
        patterns[pattern.strip()] = value.strip().lower() == "true"
    return patterns


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--lr-decay-steps must be comma-separated integers, got {text!r}") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"--lr-decay-steps must be >= 1, got {text!r}")
    return steps


def compression_params(args: argparse.Namespace) -> dict:
    """Compressor parameters given as their own flags."""
    return {"value_dtype": args.value_dtype} if args.value_dtype else {}


def agent_params(args: argparse.Namespace) -> dict[str, Any]:
    if args.agent == "static":
        return {"cf": args.cf if args.cf is not None else 100.0}
    if args.agent == "gravac":
        return {"theta_min": args.theta_min, "theta_max": args.theta_max, "epsilon": args.epsilon,
                "omega": args.omega, "omega_throughput": args.omega_throughput,
                "window": auto_window(args.steps) if args.window is None else args.window,
                "theta_s": args.theta_s,
                "policy": args.policy, "ewma": args.ewma, "gain": args.gain,
                "gain_interval": args.gain_interval,
                **({} if args.settle_steps is None else {"settle_steps": args.settle_steps}),
                "reopen_tolerance": args.reopen_tolerance or None,
                "reopen_lr_ratio": args.reopen_lr_ratio or None, "search": args.search,
                "gain_sample": args.gain_sample or None,
                "batch_size": args.batch_size or default_batch(args)}
    if args.agent == "choice":
        return {"epsilon": args.epsilon, "omega": args.omega_throughput,
                "interval": auto_window(args.steps) if args.window is None else args.window,
                "gain_sample": args.gain_sample or None,
                **({} if args.settle_steps is None else {"settle_steps": args.settle_steps}),
                **({} if args.gain_interval is None else {"gain_interval": args.gain_interval})}
    if args.agent == "accordion":
        return {"low_cf": args.low_cf, "high_cf": args.high_cf, "interval": args.interval,
                "eta": args.eta, "per_layer": not args.whole_model_norms}
    return {}


def make_agent(args: argparse.Namespace, total_steps: int | None = None,
               steps_per_epoch: int | None = None):
    """The run's agent (None: none): the time-level agent, under a layer plan with
    ``--layer-plan``. GraVAC's window, Accordion's interval in epochs and the plan interval
    follow the run's length once it is known (before, their step defaults)."""
    from horovod_gravac import agents

    params = agent_params(args)
    if args.agent == "accordion" and args.interval_unit == "epochs" and steps_per_epoch:
        params["steps_per_epoch"] = steps_per_epoch
    if args.agent == "gravac" and args.window is None and total_steps:
        params["window"] = auto_window(total_steps)
    if args.agent == "choice" and args.window is None and total_steps:
        params["interval"] = auto_window(total_steps)
    agent = agents.create(args.agent, **params)
    if not args.layer_plan:
        return agent
    factors = {} if args.plan_factors is None else {"factors": args.plan_factors}
    return agents.LayerPlan(agent, alpha=args.plan_alpha, measure_steps=args.plan_measure_steps,
                            plan_interval=args.plan_interval or auto_window(total_steps or args.steps),
                            **factors)


def auto_window(total_steps: int | None) -> int:
    """GraVAC's default window: a tenth of the run, at least 10 steps (500 when the length is
    not known yet). The exponential policy's search (warm-up, 20, 40, 160, θmax from θmin 10)
    then ends by half of the run, and the rest trains at the CF it chose."""
    return 500 if total_steps is None else max(10, total_steps // 10)


def default_batch(args: argparse.Namespace) -> int:
    return 20 if WORKLOADS[args.data][0] == "lm" else 32


class Workload:
    """Model, this rank's data, a training-step iterator and an evaluation."""

    def __init__(self, args: argparse.Namespace, rank: int, size: int) -> None:
        import torch

        from . import data as D
        from .models import create_model

        self.task, _, classes = WORKLOADS[args.data]
        self.batch = args.batch_size or default_batch(args)
        self.bptt = args.bptt
        self.eval_batches = args.eval_batches
        if self.task == "lm":
            corpus = D.PTBCorpus(args.data_dir)
            self.train = D.batchify(corpus.train, self.batch, rank, size)
            self.valid = D.batchify(corpus.valid, 10, rank, size)
            self.model = create_model(args.model, vocab=len(corpus.vocab))
            self.steps_per_epoch = math.ceil((self.train.size(1) - 1) / self.bptt)
        else:
            if args.data == "digits":
                xt, yt, xv, yv = D.load_digits_images()
            else:
                xt, yt, xv, yv = D.load_cifar(args.data_dir or "data", classes,
                                              download=not args.no_download)
            self.x, self.y = D.shard(xt, yt, rank, size)
            self.xv, self.yv = D.shard(xv, yv, rank, size)
            if args.torchvision:
                try:
                    import torchvision
                except ImportError as exc:
                    raise ValueError(f"--torchvision needs an importable torchvision ({exc})") from None
                self.model = getattr(torchvision.models, args.model)(num_classes=classes)
            else:
                self.model = create_model(args.model, num_classes=classes)
            self.steps_per_epoch = max(1, len(self.x) // self.batch)
        self.generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
        self.state = None

    def batches(self):
        """Endless (inputs, targets) for training, epoch after epoch."""
        import torch
        from .data import bptt_batches
        while True:
            if self.task == "lm":
                self.state = None
                yield from bptt_batches(self.train, self.bptt)
            else:
                order = torch.randperm(len(self.x), generator=self.generator)
                for i in range(self.steps_per_epoch):
                    idx = order[i * self.batch:(i + 1) * self.batch]
                    yield self.x[idx], self.y[idx]

    def loss(self, inputs, targets):
        import torch.nn.functional as F
        if self.task == "lm":
            if self.state is not None:
                self.state = tuple(s.detach() for s in self.state)
            logits, self.state = self.model(inputs, self.state)
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return F.cross_entropy(self.model(inputs), targets)

    def evaluate(self, hvd) -> dict[str, float]:
        """Quality on the validation split: every rank its shard, summed with one allreduce."""
        import torch
        import torch.nn.functional as F
        from .data import bptt_batches
        self.model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, count, top1, top5
        with torch.no_grad():
            if self.task == "lm":
                state = None
                for i, (x, t) in enumerate(bptt_batches(self.valid, self.bptt)):
                    if self.eval_batches and i >= self.eval_batches:
                        break
                    logits, state = self.model(x, state)
                    totals[0] += F.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1),
                                                 reduction="sum").item()
                    totals[1] += t.numel()
            else:
                for i in range(0, len(self.xv), 256):
                    if self.eval_batches and i // 256 >= self.eval_batches:
                        break
                    out = self.model(self.xv[i:i + 256])
                    t = self.yv[i:i + 256]
                    totals[0] += F.cross_entropy(out, t, reduction="sum").item()
                    totals[1] += len(t)
                    top = out.topk(min(5, out.size(1)), dim=1).indices
                    totals[2] += (top[:, 0] == t).sum().item()
                    totals[3] += (top == t[:, None]).any(dim=1).sum().item()
        self.model.train()
        totals = hvd.allreduce(totals, op=hvd.Sum, name="eval.totals")
        loss = (totals[0] / totals[1]).item()
        if self.task == "lm":
            return {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        return {"loss": loss, "accuracy": (totals[2] / totals[1]).item(),
                "top5": (totals[3] / totals[1]).item()}


@dataclasses.dataclass
class LearningRateFactor:
    """The factor on ``--lr`` after ``step`` scheduler steps (``LambdaLR``'s function): a
    linear warm-up to 1 over ``warmup`` steps, then either × ``decay_factor`` at each of
    ``decay_steps`` (as ``MultiStepLR``) or a cosine from 1 to 0 at step ``total``."""
    warmup: int
    total: int
    cosine: bool
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.cosine:
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.decay_factor ** sum(step >= s for s in self.decay_steps)


def build_base_optimizer(model, args: argparse.Namespace):
    """The optimizer the exchange wraps: SGD with momentum, or AdamW."""
    import torch
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.adam_eps,
                                 weight_decay=args.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def build_scheduler(base, args: argparse.Namespace, total_steps: int):
    """The learning-rate schedule (None: constant), stepped once per training step."""
    import torch
    if not (args.warmup_steps or args.decay_steps or args.lr_schedule == "cosine"):
        return None
    factor = LearningRateFactor(args.warmup_steps, total_steps, args.lr_schedule == "cosine",
                                tuple(args.decay_steps), args.lr_decay_factor)
    return torch.optim.lr_scheduler.LambdaLR(base, factor)


def reached(metric: str, value: float, target: float) -> bool:
    return value <= target if metric == "perplexity" else value >= target


def check_gloo_hostname() -> None:
    """Under Horovod's Gloo controller, ``hvd.init()`` dies of a segmentation fault when this
    host's name does not resolve (seen in a container whose ``/etc/hosts`` lacks it, as
    ``buildah run`` makes them): say so before it starts."""
    if os.environ.get("HOROVOD_CONTROLLER") != "gloo" and \
            "HOROVOD_GLOO_RENDEZVOUS_ADDR" not in os.environ:
        return
    name = socket.gethostname()
    try:
        socket.getaddrinfo(name, None)
    except socket.gaierror as exc:
        raise RuntimeError(
            f"this host's name {name!r} does not resolve ({exc.strerror}), and Horovod's Gloo "
            "controller needs it (hvd.init() would crash): add it to /etc/hosts (a container: "
            "--add-host or --hostname), or launch with MPI (horovodrun --mpi, mpirun)") from None


def init_torch_distributed(hvd) -> None:
    """torch.distributed (Gloo) bootstrapped from Horovod's world: rank 0 picks the address
    (``MASTER_ADDR``, the emulator's rank-0 address, or its own host's) and a free port and
    broadcasts them."""
    import socket

    import torch.distributed as dist

    endpoint = None
    if hvd.rank() == 0:
        netem = os.environ.get("GRAVAC_NETEM_ADDRESSES")
        addr = os.environ.get("MASTER_ADDR") or (netem.split(",")[0] if netem else
                                                 socket.gethostbyname(socket.gethostname()))
        port = os.environ.get("MASTER_PORT")
        if port is None:
            with socket.socket() as s:
                s.bind((addr, 0))
                port = s.getsockname()[1]
        endpoint = f"tcp://{addr}:{port}"
    endpoint = hvd.broadcast_object(endpoint, root_rank=0, name="ddp.endpoint")
    dist.init_process_group("gloo", init_method=endpoint, rank=hvd.rank(), world_size=hvd.size())


def ddp_powersgd(model, args: argparse.Namespace, hvd):
    """PyTorch DDP with its PowerSGD hook on Gloo: the outside baseline. One bucket larger
    than the model: PyTorch's PowerSGD hook on Gloo fails with a size mismatch when DDP uses
    several buckets."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.nn.parallel import DistributedDataParallel

    init_torch_distributed(hvd)
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ddp = DistributedDataParallel(model, bucket_cap_mb=size_mb + 1)
    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank,
                                   start_powerSGD_iter=args.powersgd_start,
                                   use_error_feedback=True, warm_start=True)
    ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    return ddp


def ddp_step_bytes(model, args: argparse.Namespace, step: int) -> int:
    """Bytes PyTorch's PowerSGD hook sends at ``step`` (1-based): dense before the start step,
    then P and Q for each matrix it compresses and the rest uncompressed (its own rule:
    compress when (n + m)·r·2 < n·m)."""
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        n = p.shape[0] if p.dim() > 1 else 0
        m = p.numel() // max(n, 1)
        r = args.powersgd_rank
        compressed = step > args.powersgd_start and n and (n + m) * r * 2 < n * m
        total += 4 * ((n + m) * r if compressed else p.numel())
    return total


def setup_logging(rank: int) -> None:
    """Library messages through ``logging``, prefixed with the rank: INFO on rank 0 (the CFs
    an agent chooses, skipped steps), only warnings on the others."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


def parameter_digest(model) -> str:
    """SHA-256 of every parameter's bytes in order: equal on all ranks iff the replicas are."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


#: where a step's time went: forward, backward (with this library's hooks), the optimizer
#: call (with the Horovod optimizer's exchange), and the engine's own part of those: begin
#: (error feedback, compression, starting collectives), finish (decoding, verdict, agent)
PHASE_COLUMNS = ("forward_s", "backward_s", "update_s", "begin_s", "finish_s")
#: a layer plan's: plans made so far, and the last plan's link bytes and total compression
#: error relative to the uniform CF's
PLAN_COLUMNS = ("plans", "plan_bytes_ratio", "plan_error_ratio")
#: the Adam-family exchange's: warmup or frozen, and the variance change the freeze rule saw
ADAM_COLUMNS = ("phase", "variance_change")
#: the codec choice's: the smoothed gain of the codec sent, and every candidate's (in the
#: set's order, space-separated)
CHOICE_COLUMNS = ("gain", "candidate_gains")
STEP_COLUMNS = ("step", "epoch", "wall", "step_s", "loss", "samples_per_s", "cf", "cf_sent",
                "send", "codec", "delta_min", "delta_c", "bytes", "total_bytes", "dense_bytes",
                "skipped_steps", *LINK_COLUMNS, "rounds", "link_steps",
                *PHASE_COLUMNS, *PLAN_COLUMNS, *ADAM_COLUMNS, *CHOICE_COLUMNS)


class RunLog:
    """Rank 0's records of a run: ``steps.csv``, ``evals.csv``, TensorBoard, the progress
    bar; on the other ranks it writes nothing."""

    def __init__(self, out: Path, rank: int, args: argparse.Namespace, total_steps: int,
                 first_step: int) -> None:
        self.active = rank == 0
        self.writer = self.progress = None
        #: steps per codec sent (its index in a set of candidates)
        self.codecs: dict[int, int] = {}
        if not self.active:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(flags(args), indent=1))
        self._files = [open(out / "steps.csv", "w", newline=""),
                       open(out / "evals.csv", "w", newline="")]
        self.steps, self.evals = (csv.writer(f) for f in self._files)
        self.steps.writerow(STEP_COLUMNS)
        self.evals.writerow(["step", "wall", "train_s", "total_bytes", "loss", "metric", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.writer = None
        if not args.no_progress:
            from tqdm import tqdm
            self.progress = tqdm(total=total_steps, initial=first_step - 1,
                                 desc=f"{args.model}/{args.agent}", dynamic_ncols=True)

    def step(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        self.steps.writerow([row.get(c, "") for c in STEP_COLUMNS])
        if row.get("codec") not in (None, ""):
            self.codecs[row["codec"]] = self.codecs.get(row["codec"], 0) + 1
        if self.writer:
            step = row["step"]
            for tag, key in (("train/loss", "loss"), ("train/samples_per_s", "samples_per_s"),
                             ("comm/cf", "cf"), ("comm/bytes", "total_bytes"),
                             ("gravac/delta_c", "delta_c"), ("gravac/delta_min", "delta_min"),
                             ("choice/gain", "gain"),
                             *((f"link/{c}", c) for c in LINK_COLUMNS)):
                if row.get(key) not in (None, ""):
                    self.writer.add_scalar(tag, row[key], step)
            for k, gain in enumerate((row.get("candidate_gains") or "").split()):
                if gain != "-":  # the codec choice's candidates, in the set's order
                    self.writer.add_scalar(f"choice/candidate_gain/{k}", float(gain), step)
        if self.progress:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{row['loss']:.3f}", cf=f"{row['cf']:.0f}")

    def evaluation(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        for k, v in record.items():
            if k in ("step", "wall", "train_s", "total_bytes"):
                continue
            self.evals.writerow([record["step"], record["wall"], record["train_s"],
                                 record["total_bytes"], record["loss"], k, v])
            if self.writer:
                self.writer.add_scalar(f"eval/{k}", v, record["step"])

    def close(self) -> None:
        if not self.active:
            return
        for f in self._files:
            f.close()
        if self.writer:
            self.writer.close()
        if self.progress:
            self.progress.close()


def build_exchange(args: argparse.Namespace, work: "Workload", base, hvd, agent):
    """The optimizer to step, and the front-end of this library's engine (the Horovod
    optimizer or the DDP hook's state; None for the baselines)."""
    import horovod_gravac as hg

    model = work.model
    if args.baseline == "ddp-powersgd":
        work.model = ddp_powersgd(model, args, hvd)  # checkpoints keep the plain model
        return base, None
    if args.baseline:
        wire = hvd.Compression.fp16 if args.baseline == "horovod-fp16" else hvd.Compression.none
        return hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                        compression=wire), None
    settings = exchange_settings(args, agent)
    if args.ddp:
        from torch.nn.parallel import DistributedDataParallel
        init_torch_distributed(hvd)
        work.model = DistributedDataParallel(model)
        state = hg.ddp.register_comm_hook(work.model, optimizer=base,
                                          settings=dataclasses.replace(settings,
                                                                       adam_exchange="off"))
        if settings.adam_exchange != "off":
            return hg.ddp.AdamExchangeOptimizer(base, state, settings.adam_exchange), state
        return base, state
    opt = hg.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                  granularity=args.granularity, settings=settings)
    return opt, opt


def apply_update(opt, model, clip: float | None, through_ddp: bool) -> None:
    """The optimizer step, after clipping the averaged gradients' norm to ``clip``."""
    import torch
    if clip and through_ddp:  # DDP averaged the gradients during backward
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    elif clip:
        opt.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with opt.skip_synchronize():
            opt.step()
    else:
        opt.step()


def report_columns(report: Any) -> dict[str, Any]:
    """A ``steps.csv`` row's columns from the engine's :class:`StepReport` (None: a baseline)."""
    row = report.agent_row if report is not None else {}
    decision = report.decision if report is not None else None
    measured = {"wait_s": report.wait_s, "link_bytes": report.link_bytes,
                "rounds": report.rounds, "link_steps": report.link_steps,
                "begin_s": report.begin_s, "finish_s": report.finish_s} \
        if report is not None else {}
    return {**{c: row.get(c) for c in ("delta_min", "delta_c", *LINK_COLUMNS, *PLAN_COLUMNS,
                                       *ADAM_COLUMNS, *CHOICE_COLUMNS)}, **measured,
            "cf_sent": decision.sent_cf if decision else "",
            "send": decision.send if decision else "",
            "codec": "" if decision is None or decision.codec is None else decision.codec}


@dataclasses.dataclass
class Job:
    """What a run trains with, built once by :func:`build_job`."""

    work: Workload
    model: Any  # the plain model (checkpoints keep it); ``work.model`` may wrap it in DDP
    opt: Any
    frontend: Any  # this library's optimizer or DDP state (None: a baseline)
    scheduler: Any
    total_steps: int
    dense_bytes: int  # a step's float32 gradient bytes

    @property
    def through_ddp(self) -> bool:
        return self.work.model is not self.model


@dataclasses.dataclass
class Progress:
    """Where a run stands: what a checkpoint saves and the summary reports."""

    step: int
    train_s: float = 0.0
    total_bytes: int = 0
    skipped: int = 0
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    time_to_target: float | None = None
    steps_to_target: int | None = None


def build_job(args: argparse.Namespace, hvd) -> Job:
    """The workload, the exchange and the schedule, every rank starting from rank 0's."""
    work = Workload(args, hvd.rank(), hvd.size())
    model = work.model
    total_steps = args.steps or max(1, int(args.epochs * work.steps_per_epoch))
    agent = make_agent(args, total_steps, work.steps_per_epoch)  # its length known now
    base = build_base_optimizer(model, args)
    opt, frontend = build_exchange(args, work, base, hvd, agent)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    # the state of the optimizer that steps (Horovod's documented call): every exchange starts
    # from the same state (Adam: the zero-gradient step that makes it counts in every path)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    return Job(work, model, opt, frontend, build_scheduler(base, args, total_steps), total_steps,
               sum(4 * p.numel() for p in model.parameters() if p.requires_grad))


def start(args: argparse.Namespace, job: Job):
    """The progress to start from (a checkpoint's with ``--resume``) and the batch stream,
    continued where it stopped."""
    from horovod_gravac import checkpoint

    batches = job.work.batches()
    if not args.resume:
        return Progress(step=0), batches
    resumed = checkpoint.load(args.checkpoint, job.model, job.opt, convert=args.resume_convert)
    if job.scheduler:
        job.scheduler.load_state_dict(resumed["scheduler"])
    for _ in range(resumed["step"]):  # the data stream continues where it stopped
        next(batches)
    job.work.state = resumed["rank_state"]  # this rank's LSTM state on its shard
    skipped = job.frontend.engine.skipped_steps if job.frontend is not None else 0
    return Progress(step=resumed["step"], train_s=resumed["train_s"],
                    total_bytes=resumed["total_bytes"], skipped=skipped,
                    evals=resumed["evals"]), batches


def save_checkpoint(args: argparse.Namespace, job: Job, progress: Progress) -> None:
    from horovod_gravac import checkpoint

    checkpoint.save(args.checkpoint, job.model, job.opt, step=progress.step,
                    total_bytes=progress.total_bytes, train_s=progress.train_s,
                    evals=progress.evals, rank_state=job.work.state,
                    scheduler=job.scheduler.state_dict() if job.scheduler else None)


def train(args: argparse.Namespace, job: Job, progress: Progress, batches, log: "RunLog",
          hvd) -> None:
    """Steps from ``progress.step + 1`` to the end (or the target with
    ``--stop-at-target``): each timed, logged, evaluated and checkpointed as the flags say."""
    work, opt, frontend = job.work, job.opt, job.frontend
    samples_per_step = work.batch * (work.bptt if work.task == "lm" else 1) * hvd.size()
    reports: list[Any] = []  # what this library's engine reported for the step that ended
    if frontend is not None:
        frontend.register_step_callback(reports.append)
    untimed = frontend.untimed if frontend is not None else contextlib.nullcontext
    start_time = time.perf_counter()
    for step in range(progress.step + 1, job.total_steps + 1):
        progress.step = step
        step_start = time.perf_counter()
        inputs, targets = next(batches)
        opt.zero_grad()
        loss = work.loss(inputs, targets)
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        apply_update(opt, job.model, args.clip, job.through_ddp)
        if job.scheduler:
            job.scheduler.step()
        now = time.perf_counter()
        step_time = now - step_start
        progress.train_s += step_time
        report = reports.pop() if reports else None
        if report is not None:
            sent = report.bytes
            progress.skipped += report.skipped
        else:
            sent = ddp_step_bytes(job.model, args, step) if job.through_ddp else \
                job.dense_bytes // (2 if args.baseline == "horovod-fp16" else 1)
        progress.total_bytes += sent
        with untimed():
            log.step({**report_columns(report), "forward_s": forward_end - step_start,
                      "backward_s": backward_end - forward_end, "update_s": now - backward_end,
                      "step": step, "epoch": step / work.steps_per_epoch,
                      "wall": now - start_time, "step_s": step_time, "loss": loss.item(),
                      "samples_per_s": samples_per_step / step_time,
                      "cf": sent and job.dense_bytes / sent, "bytes": sent,
                      "total_bytes": progress.total_bytes,
                      "dense_bytes": job.dense_bytes * step, "skipped_steps": progress.skipped})
            if step % args.eval_interval == 0 or step == job.total_steps:
                evaluate(args, job, progress, log, time.perf_counter() - start_time, hvd)
            if args.checkpoint_every and step % args.checkpoint_every == 0 and \
                    step < job.total_steps:
                save_checkpoint(args, job, progress)
        if args.stop_at_target and progress.time_to_target is not None:
            break


def evaluate(args: argparse.Namespace, job: Job, progress: Progress, log: "RunLog",
             wall: float, hvd) -> None:
    """An evaluation into the progress and the log; the time to target once reached."""
    metrics = job.work.evaluate(hvd)
    progress.evals.append({"step": progress.step, "wall": wall, "train_s": progress.train_s,
                           "total_bytes": progress.total_bytes, **metrics})
    log.evaluation(progress.evals[-1])
    if args.target is not None and progress.time_to_target is None and \
            reached(args.target_metric, metrics[args.target_metric], args.target):
        progress.time_to_target, progress.steps_to_target = progress.train_s, progress.step


def run(args: argparse.Namespace) -> dict[str, Any]:
    import horovod.torch as hvd
    import torch

    check_gloo_hostname()
    hvd.init()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    setup_logging(hvd.rank())
    job = build_job(args, hvd)
    progress, batches = start(args, job)
    log = RunLog(Path(args.out), hvd.rank(), args, job.total_steps, progress.step + 1)
    wall = time.perf_counter()
    train(args, job, progress, batches, log, hvd)
    if args.checkpoint:
        save_checkpoint(args, job, progress)
    wall = time.perf_counter() - wall
    digests = hvd.allgather_object(parameter_digest(job.model))
    hosts = hvd.allgather_object(socket.gethostname())
    if job.through_ddp:
        torch.distributed.destroy_process_group()
    log.close()
    specs = getattr(job.frontend.engine.compressor, "specs", ()) if job.frontend else ()
    step, dense_bytes = progress.step, job.dense_bytes
    summary = {
        "model": args.model, "data": args.data, "ranks": hvd.size(), "steps": step,
        "agent": args.agent, "compression": args.baseline or args.compression,
        "wall_s": wall, "train_s": progress.train_s,
        "time_to_target_s": progress.time_to_target,
        "steps_to_target": progress.steps_to_target, "target_metric": args.target_metric,
        "target": args.target, "final": progress.evals[-1] if progress.evals else {},
        "total_bytes": progress.total_bytes, "dense_bytes": dense_bytes * step,
        "mean_cf": dense_bytes * step / max(progress.total_bytes, 1),
        "skipped_steps": progress.skipped, "evals": progress.evals,
        "transport": "ddp" if job.through_ddp else "horovod", "hosts": hosts,
        "parameter_digests": digests, "replicas_identical": len(set(digests)) == 1,
        "codecs_sent": {specs[k]: n for k, n in sorted(log.codecs.items())}}
    if hvd.rank() == 0:
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = run(args)
    if int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))) == 0:
        final = summary["final"]
        quality = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k not in ("step", "wall", "train_s", "total_bytes"))
        print(f"{summary['compression']}/{summary['agent']} on {summary['ranks']} ranks: "
              f"{summary['steps']} steps in {summary['wall_s']:.1f} s; {quality}; "
              f"{summary['total_bytes'] / 1e6:.1f} MB sent vs {summary['dense_bytes'] / 1e6:.1f} MB "
              f"dense ({summary['mean_cf']:.1f}x less)"
              + "".join(f"; {name} for {n} steps" for name, n in summary["codecs_sent"].items()),
              flush=True)
    if not summary["replicas_identical"]:
        raise SystemExit("gravac-train: replicas diverged: the ranks' parameter digests differ "
                         f"{summary['parameter_digests']} (results are written, but suspect)")


if __name__ == "__main__":
    main()

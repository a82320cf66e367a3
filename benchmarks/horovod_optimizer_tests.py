"""Horovod's own optimizer tests, run against ``horovod_gravac.DistributedOptimizer``.

Given a checkout of Horovod (``git clone https://github.com/horovod/horovod``; nothing of it
is copied here), this runs the 13 tests of ``test/parallel/test_torch.py`` that build
``hvd.DistributedOptimizer`` on 2 ranks under ``horovodrun --gloo``, twice side by side:
with Horovod's own optimizer, and with ``hvd.DistributedOptimizer`` replaced by this
library's (``compression=hvd.Compression.none`` → ``"none"``, ``fp16`` → ``"fp16"``; every
other argument passed through). ``torch.optim.Muon`` is left out of the tests' optimizer
loops (``Optimizer.__subclasses__``): it fails for Horovod's own optimizer on torch >= 2.9.
Writes ``results/horovod_optimizer_tests/{results.json,results.md}``.

    .venv/bin/python -m benchmarks.horovod_optimizer_tests --horovod ../horovod
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import unittest
from pathlib import Path

TESTS = ("test_broadcast_state", "test_force_allreduce", "test_model_parallelism",
         "test_delta_optimizer", "test_duplicate_names", "test_dynamic_requires_grad",
         "test_gradient_clipping", "test_synchronize_step_warning", "test_no_named_parameters",
         "test_missing_named_parameters", "test_optimizer_no_named_parameters",
         "test_sparse_embeddings", "test_optimizer_process_sets")
ROOT = Path(__file__).resolve().parent.parent


def ours():
    """``hvd.DistributedOptimizer``'s signature, building this library's optimizer."""
    import horovod.torch as hvd

    import horovod_gravac as hg

    def distributed_optimizer(optimizer, named_parameters=None,
                              compression=hvd.Compression.none, backward_passes_per_step=1,
                              op=hvd.Average, gradient_predivide_factor=1.0, num_groups=0,
                              groups=None, sparse_as_dense=False,
                              process_set=hvd.global_process_set):
        wire = "fp16" if compression is hvd.Compression.fp16 else "none"
        return hg.DistributedOptimizer(optimizer, named_parameters, wire,
                                       backward_passes_per_step, op, gradient_predivide_factor,
                                       num_groups, groups, sparse_as_dense, process_set)

    return distributed_optimizer


def worker(args: argparse.Namespace) -> None:
    import horovod.torch as hvd
    import torch

    base = type.__subclasses__
    torch.optim.Optimizer.__subclasses__ = lambda: [  # Muon out of the tests' loops
        c for c in base(torch.optim.Optimizer) if c.__name__ != "Muon"]
    path = args.horovod / "test" / "parallel" / "test_torch.py"
    spec = importlib.util.spec_from_file_location("horovod_test_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if args.which == "ours":
        hvd.DistributedOptimizer = ours()
    hvd.init()
    rank = hvd.rank()  # now: the tests shut Horovod down
    results = {}
    for name in TESTS:
        outcome = unittest.TextTestRunner(stream=open(os.devnull, "w")).run(
            module.TorchTests(name))
        problems = outcome.failures + outcome.errors
        results[name] = f"skipped ({outcome.skipped[0][1]})" if outcome.skipped else (
            "passed" if not problems else "failed: " + problems[0][1].strip().splitlines()[-1])
    if rank == 0:
        Path(args.result).write_text(json.dumps(results))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--horovod", type=Path, required=True, help="a checkout of Horovod")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--controller", choices=("gloo", "mpi"), default="gloo",
                   help="horovodrun's controller (Adasum's test needs mpi)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--out", type=Path, default=Path("results/horovod_optimizer_tests"))
    p.add_argument("--worker", choices=("horovod", "ours"), dest="which", default=None)
    p.add_argument("--result", default=None)
    args = p.parse_args(argv)
    if not (args.horovod / "test" / "parallel" / "test_torch.py").is_file():
        raise FileNotFoundError(f"--horovod {args.horovod}: no test/parallel/test_torch.py; "
                                "give a checkout of https://github.com/horovod/horovod")
    if args.which:
        worker(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    table = {}
    for which in ("horovod", "ours"):
        result = args.out / f"{which}.json"
        cmd = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(args.np), "-H",
               f"localhost:{args.np}", f"--{args.controller}", sys.executable, "-m",
               "benchmarks.horovod_optimizer_tests", "--horovod", str(args.horovod.resolve()),
               "--worker", which, "--result", str(result.resolve())]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        result.unlink(missing_ok=True)
        try:
            run = subprocess.run(cmd, env=env, cwd=ROOT, timeout=args.timeout,
                                 capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            why = f"hung for {args.timeout:.0f} s"
        else:
            errors = [line for line in (run.stdout + run.stderr).splitlines()
                      if "Error:" in line and "RuntimeError: Horovod detected" not in line]
            why = f"exited {run.returncode}" + (f": {errors[0].split('>:')[-1].strip()}"
                                                if errors else "")
        if result.is_file():
            table[which] = json.loads(result.read_text())
        else:  # a crash before the tests ran (e.g. Horovod's test utilities need ``mock``)
            table[which] = {name: f"no result ({why})" for name in TESTS}
    passed = {w: sum(v == "passed" for v in r.values()) for w, r in table.items()}
    skipped = {w: sum(v.startswith("skipped") for v in r.values()) for w, r in table.items()}
    lines = [f"Horovod's optimizer tests, {args.np} ranks, {args.controller}: Horovod's optimizer "
             f"{passed['horovod']}/{len(TESTS)} passed ({skipped['horovod']} skipped by the "
             f"tests themselves), horovod_gravac's {passed['ours']}/{len(TESTS)} "
             f"({skipped['ours']} skipped)",
             "", "| test | hvd.DistributedOptimizer | horovod_gravac.DistributedOptimizer |",
             "|---|---|---|"]
    lines += [f"| {name} | {table['horovod'][name]} | {table['ours'][name]} |" for name in TESTS]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(table, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

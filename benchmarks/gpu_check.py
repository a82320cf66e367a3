"""The GPU paths in one command: ``make test-gpu`` (``python3 -m benchmarks.gpu_check``).

Made for a GPU machine that is at hand briefly: torch with CUDA and NCCL, no Horovod, no
install step, the project copied over and run from its root. In one go (a few minutes on
one GPU) it runs four phases, each in its own process, and writes everything to one folder
(default ``results/gpu/``):

1. ``unit`` and ``ddp``: pytest on ``tests/gpu`` with ``HOROVOD_GRAVAC_TEST_DEVICE=cuda``
   (two processes, so that a crash in one leaves the other's results) — the single-process
   checks on CUDA (compressors, memories, the two-stage exchange's pieces, probes, the layer
   plan's errors); then no host synchronisation in the DDP hook's backward (CUDA's sync
   debug mode, every compressor and the agents), every collective kind the engine uses on
   NCCL, two processes sharing the GPU on Gloo;
2. ``timings``: every compressor's step (error feedback, compress, decode) over ResNet-101's
   compressed gradients, at its defaults and at CF 100, against a device-to-device copy of
   the same tensors (the memory-bound floor) and against the straightforward GRACE-style
   algorithms of ``benchmarks/reference.py`` (and GRACE's own with ``--grace DIR``);
3. ``compile``: where a compressor's ``compress`` breaks a CUDA graph capture or
   ``torch.compile`` (TorchDynamo's graph breaks): a note, not a requirement.

``summary.md`` is the note, ``checks.json`` the same machine-readable; each phase's log and
raw output lie beside them. Without a CUDA device it says why and exits 0 (leaving an
earlier GPU run's results as they are). ``--device cpu`` runs the same machinery on the CPU
(a small model, written under ``runs/``): a dry run of this script, not GPU results. The exit
status is 1 when a check failed, or a phase other than ``compile`` crashed or ran out of
time.

    python3 -m benchmarks.gpu_check                 # what make test-gpu runs
    python3 -m benchmarks.gpu_check --phases timings --compressors topk,qsgd
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

from benchmarks.compressors import (GRACE, grace_pair, grace_step, library_step,  # noqa: E402
                                    make_compressor, reference_step)
from benchmarks.reference import REFERENCES  # noqa: E402
from horovod_gravac import compression as C  # noqa: E402
from horovod_gravac.app.models import parameter_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("unit", "ddp", "timings", "compile")
#: the test files each pytest phase runs
TEST_FILES = {"unit": ("tests/gpu/test_device_variants.py", "tests/gpu/test_sync_recorder.py"),
              "ddp": ("tests/gpu/test_ddp_on_device.py",)}
#: each phase's time limit (seconds): a run that goes well takes about 3 minutes on one GPU,
#: one that hangs is stopped within 8.2
PHASE_TIMEOUT = {"unit": 100, "ddp": 180, "timings": 120, "compile": 90}
#: phases whose failure fails the run (the compile phase is a note)
REQUIRED = ("unit", "ddp", "timings")
#: the goal: a compressor's step within this many times the device-copy floor
FLOOR_GOAL = 3.0
#: the goal for the whole run, in seconds
RUN_GOAL = 300.0
DEVICE_ENV = "HOROVOD_GRAVAC_TEST_DEVICE"
SYNC_TEST = "test_no_host_sync_in_backward"
log = logging.getLogger("gpu_check")


# -- the device ------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def no_cuda_reason() -> str | None:
    """Why there is no CUDA device to check (None: there is one)."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"no CUDA device (torch {torch.__version__} is built without CUDA)"
    return (f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}: "
            "torch.cuda.is_available() is False)")


def environment(device: torch.device) -> dict[str, Any]:
    """What ran the check: the machine's GPU, torch, CUDA, NCCL, Python, the commit."""
    env: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                           "python": platform.python_version(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        try:  # the run's results matter more than its description
            props = torch.cuda.get_device_properties(device)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       nccl=".".join(map(str, torch.cuda.nccl.version())))
        except (RuntimeError, AttributeError) as exc:
            env["gpu"] = f"unknown ({_first_line(exc)})"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True, timeout=10
                                       ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- phase: timings --------------------------------------------------------------------------
def gradients(model: str, device: torch.device) -> dict[str, torch.Tensor]:
    """N(0, 1e-2²) tensors of the shapes of ``model``'s parameters that the engine compresses
    (``min_compress_numel`` elements and more; the others are allreduced dense)."""
    shapes = parameter_shapes(model)
    dense = C.uncompressed_tensors([(n, s.numel()) for n, s in shapes],
                                   C.DEFAULT_MIN_COMPRESS_NUMEL)
    gen = torch.Generator(device=device).manual_seed(0)
    return {n: torch.randn(s, generator=gen, device=device) * 1e-2
            for n, s in shapes if n not in dense}


def seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call of ``fn`` after a warm-up call (torch.utils.benchmark, which
    waits for the device at the ends of every block)."""
    fn()
    timer = Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def enqueue_seconds(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> float:
    """Median host seconds to issue one call of ``fn`` on an idle device: close to its time
    on the device when the Python and the kernel launches are what limits it."""
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    synchronize(device)
    return statistics.median(times)


def settings(names: list[str], cf: float) -> list[tuple[str, str, Callable[[], C.Compressor]]]:
    """(compressor, setting, factory): each compressor at its defaults, and at ``cf`` where
    that is another setting (PowerSGD's CF instead of rank 1, Threshold's λ for ~1/cf of
    N(0, 1e-2²) gradients)."""
    out = []
    for name in names:
        default = C.create(name)
        if default.adjustable_cf and default.cf is not None:
            label = f"CF {default.cf:g} (default)"
        elif name == "powersgd":
            label = f"rank {default.rank} (default)"
        elif name == "threshold":
            label = f"λ {default.threshold:g} (default)"
        else:
            label = f"default (CF {default.nominal_cf:g})"
        out.append((name, label, lambda name=name: C.create(name)))
        if name == "threshold" or (default.adjustable_cf and default.cf != cf):
            out.append((name, f"CF {cf:g}", lambda name=name: make_compressor(name, cf)))
    return out


def copy_floor(grads: dict[str, torch.Tensor], min_run_time: float) -> dict[str, float]:
    """The memory-bound floor: a device-to-device copy of the same tensors, one by one (what
    a per-tensor step cannot beat), and of their bytes in one flat buffer (bandwidth)."""
    outputs = [torch.empty_like(g) for g in grads.values()]
    pairs = list(zip(outputs, grads.values()))
    per_tensor = seconds(lambda: [o.copy_(g) for o, g in pairs], min_run_time)
    numel = sum(g.numel() for g in grads.values())
    device = next(iter(grads.values())).device
    source, target = torch.randn(numel, device=device), torch.empty(numel, device=device)
    flat = seconds(lambda: target.copy_(source), min_run_time)
    return {"tensors": len(grads), "gradient_mb": 4 * numel / 1e6, "copy_ms": per_tensor * 1e3,
            "flat_copy_ms": flat * 1e3, "flat_copy_gbps": 2 * 4 * numel / flat / 1e9}


def time_compressors(device: torch.device, model: str, names: list[str], cf: float,
                     min_run_time: float, grace: Path | None = None,
                     progress: Callable[[dict[str, float], list[dict[str, Any]]], None]
                     | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The copy floor and one row per (compressor, setting): its step over ``model``'s
    compressed gradients on ``device``, against the floor and the GRACE-style reference;
    ``progress(floor, rows)`` after the floor and after each row."""
    grads = gradients(model, device)
    floor = copy_floor(grads, min_run_time)
    rows: list[dict[str, Any]] = []
    if progress is not None:
        progress(floor, rows)
    for name, label, factory in settings(names, cf):
        compressor = factory()
        compressor.bind(0, 1)
        memory = C.create_memory(None, compressor)
        outputs = {n: torch.empty_like(g) for n, g in grads.items()}
        steps = iter(range(10**9))
        sent = library_step(compressor, memory, grads, 0, outputs)

        def one_step(compressor=compressor, memory=memory, outputs=outputs):
            library_step(compressor, memory, grads, next(steps), outputs)

        ours = seconds(one_step, min_run_time)
        effective = compressor.cf if compressor.adjustable_cf and compressor.cf else \
            compressor.nominal_cf
        row: dict[str, Any] = {
            "compressor": name, "setting": label, "mb_sent": sent / 1e6,
            "ms": ours * 1e3, "enqueue_ms": enqueue_seconds(one_step, device) * 1e3,
            "x_copy": ours * 1e3 / floor["copy_ms"], "reference_ms": None,
            "x_faster_than_reference": None, "grace_ms": None, "x_faster_than_grace": None}
        row["within_goal"] = row["x_copy"] <= FLOOR_GOAL
        if name in REFERENCES:
            residuals = {n: torch.zeros_like(g) for n, g in grads.items()}
            ref = seconds(lambda: reference_step(REFERENCES[name], effective, grads, residuals),
                          min_run_time)
            row.update(reference_ms=ref * 1e3, x_faster_than_reference=ref / ours)
        if grace is not None and name in GRACE:
            theirs = grace_pair(grace, name, effective)
            grace_s = seconds(lambda: grace_step(*theirs, grads), min_run_time)
            row.update(grace_ms=grace_s * 1e3, x_faster_than_grace=grace_s / ours)
        rows.append(row)
        if progress is not None:
            progress(floor, rows)
    rows.append(time_adam_exchange(grads, floor, min_run_time))
    if progress is not None:
        progress(floor, rows)
    return floor, rows


def time_adam_exchange(grads: dict[str, torch.Tensor], floor: dict[str, float],
                       min_run_time: float) -> dict[str, Any]:
    """What the Adam-family exchange adds to a frozen step, compression aside: every
    gradient's preconditioned momentum (``exchanged``) and the frozen-variance update."""
    from horovod_gravac.adam import AdamExchange

    params = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p, g in zip(params, grads.values()):
        p.grad = g.clone()
    optimizer.step()  # Adam's state, then frozen
    exchange = AdamExchange(warmup=1)
    exchange.bind(optimizer)
    exchange.freeze()
    pairs = list(zip(params, grads.values()))

    def one_step():
        for p, g in pairs:
            p.grad = exchange.exchanged(p, g)
        exchange.step()

    ms = seconds(one_step, min_run_time) * 1e3
    return {"compressor": "adam exchange", "setting": "exchanged + frozen update",
            "mb_sent": 0.0, "ms": ms, "enqueue_ms": enqueue_seconds(one_step, params[0].device) * 1e3,
            "x_copy": ms / floor["copy_ms"], "reference_ms": None,
            "x_faster_than_reference": None, "grace_ms": None, "x_faster_than_grace": None,
            "within_goal": ms / floor["copy_ms"] <= FLOOR_GOAL}


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def timings_markdown(rows: list[dict[str, Any]], floor: dict[str, float]) -> str:
    """The timing table (and the floor under it) in Markdown."""
    lines = ["| compressor | setting | MB sent | ms/step | host ms to issue | × copy floor | "
             f"≤ {FLOOR_GOAL:g}× | GRACE-style ms | × faster than GRACE-style | GRACE ms | "
             "× faster than GRACE |", "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['compressor']} | {r['setting']} | {r['mb_sent']:.2f} | {r['ms']:.2f} | "
            f"{r['enqueue_ms']:.2f} | {r['x_copy']:.1f} | {'yes' if r['within_goal'] else 'no'}"
            f" | {_fmt(r['reference_ms'], '.2f')} | {_fmt(r['x_faster_than_reference'], '.2f')}"
            f" | {_fmt(r['grace_ms'], '.2f')} | {_fmt(r['x_faster_than_grace'], '.2f')} |")
    lines += ["", f"Copy floor: {floor['copy_ms']:.3f} ms a step to copy the "
                  f"{floor['tensors']:.0f} compressed gradients ({floor['gradient_mb']:.1f} MB) "
                  f"one by one; {floor['flat_copy_ms']:.3f} ms as one buffer "
                  f"({floor['flat_copy_gbps']:.0f} GB/s read + write). \"host ms to issue\" "
                  "close to ms/step: Python and kernel launches, not memory, set the pace."]
    return "\n".join(lines)


def write_timings(rows: list[dict[str, Any]], floor: dict[str, float], out: Path) -> None:
    """timings.csv and timings.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "timings.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["compressor"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "timings.md").write_text(timings_markdown(rows, floor) + "\n")


# -- phase: compile --------------------------------------------------------------------------
def dynamo_breaks(compressor: C.Compressor, x: torch.Tensor) -> dict[str, Any]:
    """TorchDynamo's graphs and graph breaks in ``compress`` (torch._dynamo.explain: what
    torch.compile would trace, without compiling)."""
    import torch._dynamo

    try:
        explained = torch._dynamo.explain(lambda t: compressor.compress(t, "w", 0))(x)
        reasons = dict.fromkeys(str(b.reason).strip().splitlines()[0][:160]
                                for b in explained.break_reasons)
        return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
                "break_reasons": "; ".join(reasons)}
    except Exception as exc:  # a note: whatever stops the tracer is the finding
        return {"graphs": None, "graph_breaks": None, "break_reasons": _first_line(exc)}
    finally:
        torch._dynamo.reset()


def cuda_graph(compressor: C.Compressor, x: torch.Tensor) -> str:
    """"captured" (and replayed), or why ``compress`` cannot be captured in a CUDA graph."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: buffers, generators, handles
            for _ in range(2):
                compressor.compress(x, "w", 0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            compressor.compress(x, "w", 0)
        graph.replay()
        torch.cuda.synchronize()
        return "captured"
    except Exception as exc:  # a note: the capture's error is the finding
        return f"breaks: {_first_line(exc)}"


def compile_notes(device: torch.device, names: list[str],
                  progress: Callable[[list[dict[str, Any]]], None] | None = None
                  ) -> list[dict[str, Any]]:
    """Per compressor (at its defaults, on a 2048×1024 gradient): TorchDynamo's graph
    breaks, then (on CUDA) whether a CUDA graph holds its ``compress``; ``progress(rows)``
    after each result."""
    x = torch.randn(2048, 1024, generator=torch.Generator().manual_seed(0)).to(device) * 1e-2
    rows = []
    for name in names:
        compressor = C.create(name)
        compressor.bind(0, 1)
        rows.append({"compressor": name, **dynamo_breaks(compressor, x), "cuda_graph": None})
        if progress is not None:
            progress(rows)
    if device.type == "cuda":
        for row in rows:
            compressor = C.create(row["compressor"])
            compressor.bind(0, 1)
            row["cuda_graph"] = cuda_graph(compressor, x)
            try:  # a failed capture must leave the device usable for the next one
                torch.ones(1, device=device).add_(1).item()
            except RuntimeError as exc:
                row["cuda_graph"] += f" (the device failed after it: {_first_line(exc)})"
                break
            finally:
                if progress is not None:
                    progress(rows)
    return rows


def compile_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| compressor | TorchDynamo graphs | graph breaks | why (first of each) | "
             "CUDA graph |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['compressor']} | {_fmt(r['graphs'], 'd')} | "
                     f"{_fmt(r['graph_breaks'], 'd')} | {r['break_reasons'] or '—'} | "
                     f"{r['cuda_graph'] or 'not tried (no CUDA)'} |")
    return "\n".join(lines)


# -- phase: tests ----------------------------------------------------------------------------
def pytest_command(phase: str, out: Path, device: torch.device) -> list[str]:
    """pytest on the phase's test files, its results in ``out/<phase>.xml``."""
    command = [sys.executable, "-m", "pytest", *TEST_FILES[phase], "-q", "-p",
               "no:cacheprovider", "-o", "junit_family=xunit1", f"--junitxml={out / phase}.xml"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command.append("--timeout=180")
    if device.type == "cpu":  # the dry run: the two-process job is the slow tier's
        command += ["-m", "not slow"]
    return command


def read_junit(path: Path) -> list[dict[str, Any]]:
    """pytest's JUnit XML as one dict per test: id, outcome (passed, failed, error, skipped,
    xfailed), message, properties, seconds."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag if tag != "failure" else "failed", node.get("message", "")
                if tag == "skipped" and node.get("type") == "pytest.xfail":
                    outcome = "xfailed"
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        module = case.get("classname", "").rsplit(".", 1)[-1]
        cases.append({"id": f"{module}::{case.get('name')}", "module": module,
                      "name": case.get("name", ""), "outcome": outcome, "message": message,
                      "properties": properties, "seconds": float(case.get("time") or 0)})
    return cases


def sync_rows(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The host-sync check per configuration, from its tests' cases."""
    prefix = SYNC_TEST + "["
    return [{"config": c["name"][len(prefix):-1], "outcome": c["outcome"],
             "hooks_per_step": c["properties"].get("hook_syncs_per_step"),
             "finish_per_step": c["properties"].get("finish_syncs_per_step"),
             "first": c["properties"].get("first_sync") or c["message"][:300]}
            for c in cases if c["name"].startswith(prefix)]


def sync_markdown(rows: list[dict[str, Any]]) -> str:
    def count(value: str | None) -> str:
        return "—" if value is None else f"{float(value):g}"

    lines = ["| configuration | outcome | host syncs per backward (hooks) | at the step's end | "
             "first sync, or the failure |", "|---|---|---|---|---|"]
    for r in rows:
        first = (r["first"] or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['config']} | {r['outcome']} | {count(r['hooks_per_step'])} | "
                     f"{count(r['finish_per_step'])} | {first or '—'} |")
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------
def run_phase(name: str, command: list[str], out: Path, timeout: float,
              env: dict[str, str]) -> dict[str, Any]:
    """Run one phase's process with its output in ``out/<name>.log``; never raises for the
    phase's own failure (a crash or a timeout is a result)."""
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as logfile:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=logfile,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode, timed_out = proc.wait(), True
    seconds_taken = time.perf_counter() - start
    log.info("%s: exit %s in %.0f s%s", name, returncode, seconds_taken,
             f" (stopped at its limit, {timeout:.0f} s)" if timed_out else "")
    return {"returncode": returncode, "seconds": round(seconds_taken, 1), "timed_out": timed_out}


def phase_command(name: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    if name in TEST_FILES:
        return pytest_command(name, args.out, device)
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--run-phase", name,
               "--device", device.type, "--out", str(args.out), "--model", args.model,
               "--cf", str(args.cf), "--min-run-time", str(args.min_run_time),
               "--compressors", ",".join(args.names)]
    if args.grace is not None:
        command += ["--grace", str(args.grace)]
    return command


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")
    tmp.replace(path)


def collect(out: Path) -> dict[str, Any]:
    """What the phases left in ``out``, read back (a phase that died leaves what it had)."""
    found: dict[str, Any] = {}
    cases = [case for phase in TEST_FILES if (out / f"{phase}.xml").exists()
             for case in read_junit(out / f"{phase}.xml")]
    if cases:
        found["tests"] = cases
    for name in ("timings", "compile"):
        if (out / f"{name}.json").exists():
            found[name] = json.loads((out / f"{name}.json").read_text())
    return found


def goals(found: dict[str, Any], phases: dict[str, dict[str, Any]], total: float
          ) -> list[dict[str, Any]]:
    """The issue's goals, each with what this run measured and whether it was met (None:
    not measured in this run)."""
    cases = found.get("tests", [])

    def outcomes(select: Callable[[dict], bool]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in cases:
            if select(c):
                counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
        return counts

    def verdict(counts: dict[str, int]) -> bool | None:
        if not counts:
            return None
        return not counts.get("failed") and not counts.get("error") and \
            bool(counts.get("passed") or counts.get("xfailed"))

    def text(counts: dict[str, int]) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "not run"

    rows = []
    unit = outcomes(lambda c: c["module"] == "test_device_variants")
    rows.append({"goal": "single-process checks on the device", "met": verdict(unit),
                 "measured": text(unit)})
    syncs = outcomes(lambda c: c["name"].startswith(SYNC_TEST + "["))
    rows.append({"goal": "no host sync in backward (DDP hook; sync debug mode on CUDA)",
                 "met": None if not syncs else verdict(syncs) and not syncs.get("xfailed"),
                 "measured": text(syncs) + (" (xfailed: known syncs, listed below)"
                                            if syncs.get("xfailed") else "")})
    kinds = [c for c in cases if c["name"] == "test_every_collective_kind_runs_on_the_backend"]
    rows.append({"goal": "every collective kind on the backend (NCCL on a GPU)",
                 "met": kinds[0]["outcome"] == "passed" if kinds else None,
                 "measured": (f"{kinds[0]['properties'].get('backend', '?')}: "
                              f"{kinds[0]['properties'].get('kinds') or kinds[0]['message'][:200]}"
                              if kinds else "not run")})
    two = outcomes(lambda c: c["name"].startswith("test_two_processes"))
    rows.append({"goal": "two processes on one device over Gloo: identical, resumed bit for "
                         "bit, NaN skipped", "met": verdict(two), "measured": text(two)})
    timing = found.get("timings", {}).get("rows", [])
    slow = [f"{r['compressor']} ({r['setting']}) {r['x_copy']:.1f}×" for r in timing
            if not r["within_goal"]]
    rows.append({"goal": f"compressors within {FLOOR_GOAL:g}× of the device-copy floor",
                 "met": not slow if timing else None,
                 "measured": (f"{len(timing) - len(slow)} of {len(timing)}; beyond: "
                              + (", ".join(slow) or "none")) if timing else "not run"})
    rows.append({"goal": f"the whole run within {RUN_GOAL:.0f} s", "met": total <= RUN_GOAL,
                 "measured": f"{total:.0f} s (" + ", ".join(
                     f"{n} {p['seconds']:.0f} s" for n, p in phases.items()) + ")"})
    return rows


def summary_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {report['status']}", "",
             f"{report['date']}; {env.get('gpu', env['device'])}, torch {env['torch']}"
             + (f" (CUDA {env['cuda']}, NCCL {env.get('nccl', '?')})" if env.get("cuda") else "")
             + f", Python {env['python']}, commit {env.get('commit') or 'unknown'}; "
             f"{report['seconds']:.0f} s in all.", ""]
    if report["status"] == "skipped":
        return "\n".join(lines + [f"skipped: {report['reason']}", ""])
    if env["device"] == "cpu":
        lines += ["A dry run on the CPU (`--device cpu`): these are not GPU results.", ""]
    lines += ["## Goals", "", "| goal | met | measured |", "|---|---|---|"]
    for g in report["goals"]:
        met = {True: "yes", False: "no", None: "—"}[g["met"]]
        lines.append(f"| {g['goal']} | {met} | {g['measured']} |")
    for name, phase in report["phases"].items():
        if phase["returncode"] != 0:
            lines += ["", f"Phase `{name}` exited {phase['returncode']}"
                          + (" (stopped at its time limit)" if phase["timed_out"] else "")
                          + f": see `{name}.log`."]
    tests = report.get("tests", [])
    failed = [c for c in tests if c["outcome"] in ("failed", "error")]
    if failed:
        lines += ["", "## Failed checks", ""]
        lines += [f"- `{c['id']}`: {c['message'][:400]}".replace("\n", " ")
                  for c in failed[:30]]
        if len(failed) > 30:
            lines.append(f"- and {len(failed) - 30} more: see `unit.log` and `ddp.log`")
    syncs = sync_rows(tests)
    if syncs:
        lines += ["", "## Host syncs in backward, per configuration", "",
                  "Through the DDP hook on one rank, after two warm-up steps, three watched "
                  "(CUDA's sync debug mode at \"warn\", each with its Python stack) and, when "
                  "none was seen, one more with it at \"error\". \"At the step's end\": the "
                  "engine's end of the step, which DDP runs inside backward (its one read of "
                  "the step's verdict, by design).", "", sync_markdown(syncs)]
    timing = report.get("timings")
    if timing and timing.get("rows"):
        lines += ["", f"## Compressor timings ({timing['model']}'s compressed gradients, "
                      f"{timing['device']})", "", timings_markdown(timing["rows"],
                                                                    timing["floor"])]
    if report.get("compile"):
        lines += ["", "## CUDA graphs and torch.compile (a note)", "",
                  compile_markdown(report["compile"])]
    outputs = {"unit": "unit.xml, unit.log (pytest)", "ddp": "ddp.xml, ddp.log (pytest)",
               "timings": "timings.csv, timings.md, timings.json, timings.log",
               "compile": "compile.json, compile.log"}
    files = ["checks.json (all of this)"] + [outputs[p] for p in report["phases"]]
    lines += ["", f"Files beside this one: {'; '.join(files)}.", ""]
    return "\n".join(lines)


def skip(out: Path, reason: str, start: float) -> int:
    """No CUDA device: say so, and write it to ``out`` unless a GPU run's results are there."""
    print(f"skipped: {reason}")
    previous = out / "checks.json"
    if previous.exists() and json.loads(previous.read_text()).get("status") != "skipped":
        print(f"(the GPU results in {out} are left as they are)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    report = {"status": "skipped", "reason": reason,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "environment": environment(torch.device("cpu")),
              "seconds": time.perf_counter() - start}
    write_json(previous, report)
    (out / "summary.md").write_text(summary_markdown(report))
    return 0


def run_all(args: argparse.Namespace, device: torch.device) -> int:
    """Every phase in its own process, then the summary; 1 when a check failed or a required
    phase crashed or ran out of time."""
    start = time.perf_counter()
    described = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("unit.xml", "ddp.xml", "timings.json", "compile.json"):
        (args.out / stale).unlink(missing_ok=True)
    env = dict(os.environ, **{DEVICE_ENV: device.type})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    phases = {}
    for name in args.phases:
        log.info("%s: running (at most %d s)", name, args.timeouts[name])
        phases[name] = run_phase(name, phase_command(name, args, device), args.out,
                                 args.timeouts[name], env)
    total = time.perf_counter() - start
    found = collect(args.out)
    failed = any(p["returncode"] != 0 for n, p in phases.items() if n in REQUIRED)
    report = {"status": "failed" if failed else "passed",
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "environment": described, "seconds": round(total, 1),
              "phases": phases, "goals": goals(found, phases, total), **found}
    write_json(args.out / "checks.json", report)
    (args.out / "summary.md").write_text(summary_markdown(report))
    print(summary_markdown(report))
    print(f"wrote {args.out}/summary.md, checks.json and each phase's files")
    return 1 if failed else 0


def run_one_phase(args: argparse.Namespace, device: torch.device) -> int:
    """Inside a phase's process: run it, writing ``<phase>.json`` as results come in (a
    phase stopped at its time limit leaves what it had)."""
    out = args.out
    if args.run_phase == "timings":
        meta = {"model": args.model, "device": environment(device).get("gpu", device.type),
                "cf": args.cf}

        def progress(floor: dict[str, float], rows: list[dict[str, Any]]) -> None:
            if rows:
                log.info("%s (%s): %.2f ms, %.1f× the copy floor", rows[-1]["compressor"],
                         rows[-1]["setting"], rows[-1]["ms"], rows[-1]["x_copy"])
            write_json(out / "timings.json", {**meta, "floor": floor, "rows": rows})

        floor, rows = time_compressors(device, args.model, args.names, args.cf,
                                       args.min_run_time, args.grace, progress)
        write_timings(rows, floor, out)
    else:
        compile_notes(device, args.names, lambda rows: write_json(out / "compile.json", rows))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda if there is one, else skip (default); cpu: a dry run")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default results/gpu; runs/gpu-check-cpu for cpu)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated, of {', '.join(PHASES)} (default all)")
    parser.add_argument("--compressors", default="all",
                        help="timed and compiled: comma-separated names or 'all'")
    parser.add_argument("--model", default=None,
                        help="whose gradients are timed (default resnet101; resnet20 on cpu)")
    parser.add_argument("--cf", type=float, default=100.0,
                        help="the CF of adjustable compressors' second setting")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds each timing runs for (default 0.25; 0.02 on cpu)")
    parser.add_argument("--grace", type=Path, default=None, metavar="DIR",
                        help="a GRACE checkout (github.com/sands-lab/grace): time its TopK "
                             "and QSGD too")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every phase's time limit (a slower machine)")
    parser.add_argument("--run-phase", choices=("timings", "compile"),
                        help=argparse.SUPPRESS)  # inside a phase's own process
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown or not args.phases:
        raise ValueError(f"--phases must name some of {', '.join(PHASES)}, got "
                         f"{', '.join(unknown) or 'none'}")
    args.names = C.names() if args.compressors == "all" else \
        [n.strip() for n in args.compressors.split(",") if n.strip()]
    bad = [n for n in args.names if n not in C.names()]
    if bad or not args.names:
        raise ValueError(f"--compressors: unknown {', '.join(bad) or 'empty list'}; valid: "
                         f"all, or some of {', '.join(C.names())}")
    C.validate_cf(args.cf)
    if args.timeout_scale <= 0:
        raise ValueError(f"--timeout-scale must be > 0, got {args.timeout_scale:g}")
    if args.min_run_time is not None and args.min_run_time <= 0:
        raise ValueError(f"--min-run-time must be > 0, got {args.min_run_time:g}")
    if args.grace is not None and not (args.grace / "grace_dl" / "torch").is_dir():
        raise ValueError(f"--grace {args.grace}: no grace_dl/torch in it; give a checkout of "
                         "https://github.com/sands-lab/grace")
    args.timeouts = {p: t * args.timeout_scale for p, t in PHASE_TIMEOUT.items()}
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[gpu-check] %(message)s")
    start = time.perf_counter()
    args = parse_args(argv)
    cpu = args.device == "cpu"
    args.out = args.out or ROOT / ("runs/gpu-check-cpu" if cpu else "results/gpu")
    args.model = args.model or ("resnet20" if cpu else "resnet101")
    parameter_shapes(args.model)  # an unknown model fails here, naming the valid ones
    args.min_run_time = args.min_run_time or (0.02 if cpu else 0.25)
    if not cpu:
        reason = no_cuda_reason()
        if reason is not None:
            return skip(args.out, reason, start)
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    if args.run_phase is not None:
        return run_one_phase(args, device)
    return run_all(args, device)


if __name__ == "__main__":
    sys.exit(main())

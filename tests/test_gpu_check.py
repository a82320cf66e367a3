"""benchmarks/gpu_check.py (``make test-gpu``) on a machine without a GPU: it skips cleanly,
saying why, and its tables, JUnit reading and summary work on CPU numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check as G

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_without_cuda_it_skips_saying_why_and_writes_that_down(no_cuda, tmp_path, capsys):
    assert G.main(["--out", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("skipped: no CUDA device (torch ")
    assert "skipped: no CUDA device (" in (tmp_path / "summary.md").read_text()
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert checks["status"] == "skipped" and checks["reason"].startswith("no CUDA device")
    assert not (tmp_path / "unit.xml").exists()


def test_a_skip_leaves_an_earlier_gpu_run_as_it_is(no_cuda, tmp_path, capsys):
    (tmp_path / "checks.json").write_text(json.dumps({"status": "passed"}))
    (tmp_path / "summary.md").write_text("the GPU's results\n")
    assert G.main(["--device", "cuda", "--out", str(tmp_path)]) == 0
    assert "left as they are" in capsys.readouterr().out
    assert (tmp_path / "summary.md").read_text() == "the GPU's results\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: it would run")
def test_the_script_runs_from_a_bare_checkout_and_skips(tmp_path):
    """As a GPU machine runs it: python3 on the file, no PYTHONPATH, no installed package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skipped: no CUDA device (")


@pytest.mark.parametrize("argv,message", [
    (["--phases", "unit,nope"], "--phases must name some of unit, ddp, timings, compile, got nope"),
    (["--compressors", "topk,nope"], "--compressors: unknown nope; valid: all, or some of"),
    (["--cf", "0.5"], r"cf \(compression factor"),
    (["--timeout-scale", "0"], "--timeout-scale must be > 0"),
    (["--min-run-time", "-1"], "--min-run-time must be > 0"),
    (["--grace", "/nonexistent"], "no grace_dl/torch in it"),
])
def test_bad_flags_raise_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        G.parse_args(argv)


def test_the_timing_table_is_written_from_cpu_numbers(tmp_path):
    seen = []
    floor, rows = G.time_compressors(torch.device("cpu"), "mlp", ["topk", "qsgd", "powersgd"],
                                     100.0, min_run_time=0.002,
                                     progress=lambda f, r: seen.append(len(r)))
    assert seen == [0, 1, 2, 3, 4, 5]  # the floor, then each row as it comes
    assert [(r["compressor"], r["setting"]) for r in rows] == [
        ("topk", "CF 100 (default)"), ("qsgd", "default (CF 4)"),
        ("powersgd", "rank 1 (default)"), ("powersgd", "CF 100"),
        ("adam exchange", "exchanged + frozen update")]
    assert floor["copy_ms"] > 0 and floor["flat_copy_gbps"] > 0 and floor["tensors"] >= 2
    for r in rows:
        assert r["ms"] > 0 and r["x_copy"] == pytest.approx(r["ms"] / floor["copy_ms"])
        assert r["within_goal"] == (r["x_copy"] <= G.FLOOR_GOAL)
    assert rows[0]["reference_ms"] > 0 and rows[2]["reference_ms"] is None  # no PowerSGD's
    G.write_timings(rows, floor, tmp_path)
    table = (tmp_path / "timings.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(rows)
    assert "Copy floor: " in table
    csv_lines = (tmp_path / "timings.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and csv_lines[0].startswith("compressor,setting,")


def test_the_timing_markdown_of_known_numbers():
    floor = {"tensors": 3, "gradient_mb": 1.5, "copy_ms": 0.5, "flat_copy_ms": 0.25,
             "flat_copy_gbps": 12.0}
    rows = [{"compressor": "topk", "setting": "CF 100 (default)", "mb_sent": 0.015, "ms": 4.0,
             "enqueue_ms": 3.9, "x_copy": 8.0, "within_goal": False, "reference_ms": 8.0,
             "x_faster_than_reference": 2.0, "grace_ms": None, "x_faster_than_grace": None},
            {"compressor": "fp16", "setting": "default (CF 2)", "mb_sent": 0.75, "ms": 1.0,
             "enqueue_ms": 0.2, "x_copy": 2.0, "within_goal": True, "reference_ms": None,
             "x_faster_than_reference": None, "grace_ms": None, "x_faster_than_grace": None}]
    lines = G.timings_markdown(rows, floor).splitlines()
    assert lines[2] == ("| topk | CF 100 (default) | 0.01 | 4.00 | 3.90 | 8.0 | no | 8.00 | 2.00 "
                        "| — | — |")
    assert lines[3] == ("| fp16 | default (CF 2) | 0.75 | 1.00 | 0.20 | 2.0 | yes | — | — "
                        "| — | — |")
    assert lines[-1].startswith("Copy floor: 0.500 ms a step to copy the 3 compressed gradients "
                                "(1.5 MB) one by one; 0.250 ms as one buffer (12 GB/s")


JUNIT = textwrap.dedent("""\
    <?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
    <testcase classname="tests.gpu.test_device_variants" name="test_round_trip[topk]" time="0.1"/>
    <testcase classname="tests.gpu.test_device_variants" name="test_round_trip[dgc]" time="0.1">
      <failure message="AssertionError: not finite">trace</failure></testcase>
    <testcase classname="tests.gpu.test_ddp_on_device" name="test_no_host_sync_in_backward[topk]"
        time="0.2"><properties><property name="hook_syncs_per_step" value="0.0"/>
        <property name="finish_syncs_per_step" value="1.0"/></properties></testcase>
    <testcase classname="tests.gpu.test_ddp_on_device"
        name="test_no_host_sync_in_backward[gravac (topk)]" time="0.2"><properties>
        <property name="hook_syncs_per_step" value="1.0"/>
        <property name="finish_syncs_per_step" value="2.0"/>
        <property name="first_sync" value="engine.py:426 decision: values.tolist()"/>
        </properties><skipped type="pytest.xfail" message="known: the decision"/></testcase>
    <testcase classname="tests.gpu.test_ddp_on_device"
        name="test_every_collective_kind_runs_on_the_backend" time="1.0"><properties>
        <property name="backend" value="nccl"/>
        <property name="kinds" value="all_reduce on cuda, broadcast on cuda"/></properties>
    </testcase></testsuite></testsuites>""")


def test_junit_results_become_goals_and_the_summary(tmp_path):
    (tmp_path / "unit.xml").write_text(JUNIT)
    cases = G.collect(tmp_path)["tests"]
    assert [(c["module"], c["outcome"]) for c in cases] == [
        ("test_device_variants", "passed"), ("test_device_variants", "failed"),
        ("test_ddp_on_device", "passed"), ("test_ddp_on_device", "xfailed"),
        ("test_ddp_on_device", "passed")]
    syncs = G.sync_rows(cases)
    assert [(s["config"], s["outcome"], s["hooks_per_step"]) for s in syncs] == [
        ("topk", "passed", "0.0"), ("gravac (topk)", "xfailed", "1.0")]
    phases = {"unit": {"returncode": 1, "seconds": 40.0, "timed_out": False}}
    goals = {g["goal"]: g for g in G.goals({"tests": cases}, phases, 40.0)}
    assert goals["single-process checks on the device"]["met"] is False
    assert goals["single-process checks on the device"]["measured"] == "1 failed, 1 passed"
    assert goals["no host sync in backward (DDP hook; sync debug mode on CUDA)"]["met"] is False
    assert goals["every collective kind on the backend (NCCL on a GPU)"]["measured"] == \
        "nccl: all_reduce on cuda, broadcast on cuda"
    assert goals["compressors within 3× of the device-copy floor"]["met"] is None
    report = {"status": "failed", "date": "today", "seconds": 40.0, "phases": phases,
              "environment": {"device": "cuda:0", "gpu": "NVIDIA H100", "torch": "2.11",
                              "cuda": "13.0", "nccl": "2.27.3", "python": "3.12"},
              "goals": list(goals.values()), "tests": cases}
    summary = G.summary_markdown(report)
    assert summary.startswith("# GPU check: failed\n\ntoday; NVIDIA H100, torch 2.11 (CUDA 13.0")
    assert "| gravac (topk) | xfailed | 1 | 2 | engine.py:426 decision: values.tolist() |" \
        in summary
    assert "- `test_device_variants::test_round_trip[dgc]`: AssertionError: not finite" in summary
    assert "Phase `unit` exited 1: see `unit.log`." in summary


def test_a_phase_that_hangs_is_stopped_at_its_limit(tmp_path):
    result = G.run_phase("slow", [sys.executable, "-c", "import time; time.sleep(30)"],
                         tmp_path, timeout=0.5, env=dict(os.environ))
    assert result["timed_out"] and result["returncode"] != 0 and result["seconds"] < 10
    assert (tmp_path / "slow.log").exists()

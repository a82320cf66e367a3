"""The documentation: ``gravac-train --help`` lists every registered name, and the Sphinx site
(docs/) builds with warnings as errors, so a renamed function breaks the build, not the reader."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from horovod_gravac import agents, compression
from horovod_gravac.app import train
from horovod_gravac.app.models import MODELS

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_models_data_compressors_and_agents():
    text = train.build_parser().format_help()
    assert set(train.MODEL_HELP) == set(MODELS)
    assert set(train.DATA_HELP) == set(train.WORKLOADS)
    epilog = text[text.index("models (--model"):].splitlines()
    names = {line.split()[0] for line in epilog if line.startswith("  ")}
    assert names == set(MODELS) | set(train.WORKLOADS) | set(compression.COMPRESSORS) \
        | set(agents.AGENTS) | {"none"}
    for line in epilog:  # one line each, plain text
        assert ":class:" not in line and "``" not in line


def test_usage_errors_stay_quick_and_plain(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--data", "nope"])
    assert exc.value.code == 2
    assert "models (--model" not in capsys.readouterr().err


def test_docs_build_without_warnings(tmp_path):
    """What ``make docs`` runs, into a temporary directory: -W makes every warning an error
    (a reference to a renamed class or function, a broken include of results/, a docstring
    reST cannot read); a warning that docutils prints past Sphinx's logging fails it too."""
    pytest.importorskip("sphinx", reason="the docs extra is not installed (EXTRAS=...,docs)")
    pytest.importorskip("myst_parser", reason="the docs extra is not installed")
    pytest.importorskip("sphinxarg", reason="the docs extra is not installed")
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(out)],
        capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "WARNING" not in log and "ERROR" not in log, log
    for page in ("index", "guides/horovod", "design/agents", "results/this_release",
                 "reference/cli", "api/optimizer"):
        assert (out / f"{page}.html").is_file(), page
    assert "DistributedOptimizer" in (out / "api" / "optimizer.html").read_text()
    assert "cnn_digits" in (out / "reference" / "cli.html").read_text()

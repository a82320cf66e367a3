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

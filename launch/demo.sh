#!/usr/bin/env bash
# The main job: GraVAC choosing the CF while 2 ranks train the small PTB LSTM on real data,
# each rank behind an emulated 100 Mbit/s link (as root with iproute2; otherwise on the
# unshaped local machine, where communication is cheap and GraVAC rightly stays low), then a
# dense run of the same length for the quality comparison (quality does not depend on the
# link, so it runs unshaped). Ends with a summary: CFs visited and chosen, perplexity of both,
# bytes sent, the CF timeline PNG. About 5 minutes on 2 CPU cores.
#   NP (2), STEPS (300), LINK (100mbit; "none" for no emulation), OUT (runs/demo)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
out="${OUT:-$repo/runs/demo}"
rm -rf "$out"
LINK="${LINK:-100mbit}"
workload=(--model lstm200 --data ptb --steps "${STEPS:-300}" --eval-interval 100
          --eval-batches 40 --lr 1 --momentum 0 --clip 0.25 --no-progress)
if [ "$LINK" != none ] && [ "$(id -u)" -eq 0 ] && command -v tc >/dev/null && command -v ip >/dev/null; then
    echo "GraVAC on $NP ranks, each behind an emulated $LINK link"
    "$VENV/bin/python" "$repo/launch/netem.py" --np "$NP" --rate "$LINK" --delay none -- \
        "$VENV/bin/gravac-train" "${workload[@]}" --compression topk \
        --agent gravac --out "$out/gravac" | grep -v '^\[netem\]'
    link="$LINK links"
else
    echo "GraVAC on $NP ranks, unshaped local links (emulation needs root and iproute2)"
    (launch_training "${workload[@]}" --compression topk --agent gravac --out "$out/gravac") \
        | grep -v '^\[[1-9]'
    link="unshaped links"
fi
echo "dense Horovod, same steps (for the quality comparison)"
(launch_training "${workload[@]}" --baseline horovod --out "$out/dense") | grep -v '^\[[1-9]'
"$VENV/bin/gravac-plot" "$out/gravac" --out "$out/plots" >/dev/null
"$VENV/bin/python" - "$out" "$link" <<'PY'
import csv, json, sys
out, link = sys.argv[1:]
g = json.load(open(f"{out}/gravac/summary.json"))
d = json.load(open(f"{out}/dense/summary.json"))
visits = []
with open(f"{out}/gravac/steps.csv") as f:
    for row in csv.DictReader(f):
        cf = float(row["cf_sent"])  # the CF of what was sent (TopK: 1/CF of the values)
        if not visits or visits[-1][1] != cf:
            visits.append((int(row["step"]), cf))
print(f"\nGraVAC demo: {g['ranks']} ranks, {g['steps']} steps, {link}, {g['train_s']:.0f} s training")
print("  CF sent, from step: "
      + ", ".join(f"{s}: {cf:g}x" for s, cf in visits))
print(f"  distinct CFs sent: {len({cf for _, cf in visits})}; last: {visits[-1][1]:g}x")
pg, pd = g["final"]["perplexity"], d["final"]["perplexity"]
print(f"  validation perplexity: GraVAC {pg:.1f}, dense {pd:.1f} ({100 * (pg / pd - 1):+.1f}%)")
print(f"  bytes sent per rank: GraVAC {g['total_bytes'] / 1e6:.1f} MB, dense "
      f"{d['total_bytes'] / 1e6:.1f} MB ({d['total_bytes'] / g['total_bytes']:.1f}x less)")
print(f"  CF timeline plot: {out}/plots/cf_gain.png")
PY

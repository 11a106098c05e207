#!/usr/bin/env bash
# A/B of two training recipes on the demo data on a GPU, same steps each (exploration only).
set -u
OUT="${OUT:-./gpu_out}"; T=$(mktemp -d); KP="python3 -m kitspipe --no-progress"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
$KP synth "$T/data" --cases 24 --seed 0 --size small >/dev/null
$KP synth "$T/test" --cases 6 --seed 0 --size small --first-index 10000 >/dev/null
$KP fingerprint "$T/data" --work "$T/base" >/dev/null && $KP plan "$T/base" --preset cpu >/dev/null && $KP preprocess "$T/base" -j 12 >/dev/null
for variant in A B; do
  W="$T/$variant"; cp -r "$T/base" "$W"
  python3 - "$W/plans.json" "$variant" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
p["training"].update(num_workers=12, steps_per_epoch=150, max_epochs=6, mixed_precision="bf16", max_minutes=1.0)
if sys.argv[2] == "B":
    p["loss"].update(high_positive_weights=[1.0, 1.0], low_positive_weight=1.0)
json.dump(p, open(sys.argv[1], "w"), indent=2)
PY
  timeout 100 $KP train "$W" --device cuda 2>&1 | grep -E "epoch" | tail -n 3
  $KP infer "$W" "$T/test" "$W/pred" --device cuda >/dev/null 2>&1
  echo "variant $variant"; $KP evaluate "$W/pred" "$T/test" --out "$W/eval" 2>&1 | tail -n 1
  cp "$W/eval/metrics_per_case.csv" "$OUT/ab_$variant.csv"
done

#!/usr/bin/env bash
# The demo's recipe (cpu preset, built-in synthetic data) trained on a GPU for a few minutes:
# how far does the same method get with many more steps than a 2-core CPU affords?
#   PYTHONPATH=/path/to/repo OUT=/somewhere MINUTES=4 bash bench/gpu_demo_convergence.sh
set -u
OUT="${OUT:-./gpu_out}"; MINUTES="${MINUTES:-4}"; T=$(mktemp -d)
KP="python3 -m kitspipe --no-progress"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
mkdir -p "$OUT"
$KP synth "$T/data" --cases 24 --seed 0 --size small
$KP synth "$T/test" --cases 6 --seed 0 --size small --first-index 10000
$KP fingerprint "$T/data" --work "$T/work" && $KP plan "$T/work" --preset cpu
python3 - "$T/work/plans.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
p["training"].update(num_workers=12, steps_per_epoch=200, max_epochs=200, mixed_precision="bf16")
json.dump(p, open(sys.argv[1], "w"), indent=2)
PY
$KP preprocess "$T/work" -j 8
timeout $(( MINUTES * 60 + 60 )) $KP train "$T/work" --max-minutes "$MINUTES" --device cuda
$KP infer "$T/work" "$T/test" "$T/pred" --device cuda
$KP infer "$T/work" "$T/test" "$T/raw" --device cuda --no-postprocessing
$KP evaluate "$T/pred" "$T/test" --out "$T/eval"
$KP evaluate "$T/raw" "$T/test" --out "$T/evalraw" | tail -n 2
cp "$T/work/fold_0/DualResolutionTrainer/training_log.csv" "$OUT/convergence_training_log.csv"
cp "$T/work/fold_0/DualResolutionTrainer/progress.png" "$OUT/convergence_progress.png"
cp "$T/eval/metrics_per_case.csv" "$OUT/convergence_metrics_per_case.csv"
cp "$T/work/plans.json" "$OUT/convergence_plans.json"

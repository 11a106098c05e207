#!/usr/bin/env bash
# One short GPU session: measure the training step and inference on CUDA (float32 and bf16) and
# prove that the real `kitspipe train` / `kitspipe infer` path runs on CUDA with mixed precision.
#
#   PYTHONPATH=/path/to/repo OUT=/somewhere bash bench/gpu_session.sh
#
# Written for a fresh GPU machine where nothing can be installed: the caller puts the repository
# (and any extra wheels) on PYTHONPATH, and the `kitspipe` console script is not installed, so
# everything runs as `python3 -m kitspipe` / `python3 bench/....py`. All output goes to $OUT
# (default ./gpu_out): every step's output in session.log, bench JSON lines in results.jsonl,
# steps.tsv with each step's exit code and seconds, and the tiny training run's log and checkpoint sidecar.
#
# The whole session must end within 8 minutes on one H100: every step runs under `timeout`, bounded
# by its own limit and by what is left of SESSION_S (bench/gpu_steps.sh); a failing or timed-out
# step is recorded and the next one runs. Steps come in order of importance, so a slow machine loses the extras first.
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu: a dry run of the script itself on a machine without a GPU
SESSION_S="${SESSION_S:-450}"  # leaves 30 s of the 8 minutes for start-up and copying $OUT back
source bench/gpu_steps.sh  # OUT, TMP, STARTED, PY, KP and step()

# --- 0. the machine (in the session log, and as JSON for the record)
{
    nvidia-smi || true
    $PY - <<'EOF'
import importlib, json, platform
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(device=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                free_gib=round(torch.cuda.mem_get_info()[0] / 2**30, 1))
missing = []
for module in ("numpy", "scipy", "skimage", "pandas", "matplotlib", "tqdm", "threadpoolctl", "SimpleITK",
               "nibabel", "batchgenerators"):
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - report every missing dependency, not the first
        missing.append(f"{module}: {type(error).__name__}: {error}")
info["missing"] = missing
print(json.dumps(info, indent=1))
EOF
} > "$OUT/environment.log" 2>&1
cat "$OUT/environment.log" | tail -n 20

# The full-size case for inference is written in the background while the GPU steps run.
( $KP synth "$TMP/full" --cases 1 --size full > "$OUT/synth_full.log" 2>&1; echo "exit $?" >> "$OUT/synth_full.log" ) &
SYNTH_FULL=$!

# --- 1. small synthetic cases: the tiny training run and the train_step benchmark's patches
step synth_small 60 $KP synth "$TMP/small" --cases 6 --size small

# --- 2. the real training path on CUDA: one epoch per phase, bf16, channels-last; then infer
cat > "$TMP/gpu-smoke.json" <<'EOF'
{
  "extends": "cpu",
  "preset": "gpu-smoke",
  "training": {"n_folds": 2, "steps_per_epoch": 20, "pretraining_max_epochs": 1, "max_minutes": 3.0,
               "mixed_precision": "bf16", "channels_last": true},
  "inference": {"mixed_precision": "bf16"}
}
EOF
train_and_infer() {  # run by `timeout` in a child bash: exported below with the variables it reads
    set -e
    $KP fingerprint "$TMP/small" --work "$TMP/work"
    $KP plan "$TMP/work" --preset "$TMP/gpu-smoke.json"
    $KP preprocess "$TMP/work" -j 4
    $KP train "$TMP/work" --fold 0 --epochs 1 --device "$DEVICE" --mixed-precision bf16
    $KP infer "$TMP/work" "$TMP/small" "$TMP/predictions" --device "$DEVICE" --mixed-precision bf16 --mode fast
    $KP evaluate "$TMP/predictions" "$TMP/small" --out "$TMP/evaluation"
}
export -f train_and_infer
export TMP KP DEVICE
step kitspipe_train_infer_bf16 150 bash -c train_and_infer
cp "$TMP/work/fold_0/DualResolutionTrainer/training_log.csv" "$OUT/tiny_training_log.csv" 2>/dev/null
cp "$TMP/work/fold_0/DualResolutionTrainer/checkpoint_latest.json" "$OUT/tiny_checkpoint_latest.json" 2>/dev/null
cp "$TMP/evaluation/summary.json" "$OUT/tiny_evaluation_summary.json" 2>/dev/null

# --- 3. the paper training step: bf16, then float32 (same cases, same machine)
BENCH="--device $DEVICE --quick --results $OUT/results.jsonl"
step train_step_paper_bf16 130 $PY bench/train_step.py $BENCH --presets paper --data "$TMP/small" --amp
# --- 4. inference of one full-size case, paper (100 mm crop) and fast (whole case) tiling, bf16
wait "$SYNTH_FULL"
step infer_bf16 150 $PY bench/infer.py $BENCH --data "$TMP/full" --amp
step train_step_paper_fp32 120 $PY bench/train_step.py $BENCH --presets paper --data "$TMP/small"

# --- 5. extras while time is left: channels-last, and torch.compile through kitspipe train
step train_step_paper_bf16_channels_last 100 $PY bench/train_step.py $BENCH --presets paper --data "$TMP/small" \
    --amp --channels-last
step kitspipe_train_compile 120 $KP train "$TMP/work" --fold 1 --epochs 1 --device "$DEVICE" --mixed-precision bf16 \
    --compile

mkdir -p "$OUT/stage_logs" && cp "$TMP/work/logs/"*.log "$OUT/stage_logs/" 2>/dev/null
echo "== done in $(elapsed) s; outputs in $OUT"
cat "$OUT/steps.tsv"
rm -rf "$TMP"

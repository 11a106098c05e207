#!/usr/bin/env bash
# One short GPU session on the levers of the `paper` preset's training step (issue 6): what
# cuDNN's algorithm timing (training.deterministic off), a larger batch and torch.compile's
# CUDA graphs buy, measured as shares of a plain conv3d in the same process, plus a profile of
# one step and the real `kitspipe train` on CUDA with the plan's defaults.
#
#   PYTHONPATH=/path/to/repo OUT=/somewhere bash bench/gpu_training_levers.sh
#   DEVICE=cpu PRESET=cpu SESSION_S=300 bash bench/gpu_training_levers.sh   # a dry run without a GPU
#
# Steps come in order of importance under one time budget (SESSION_S, default 480 s), each under
# `timeout` (bench/gpu_steps.sh); a failed or timed-out step is recorded in steps.tsv and the next
# one runs. Bench JSON lines go to $OUT/results.jsonl, every step's output to $OUT/session.log, the
# profile to $OUT/profile.txt; each training-step table is echoed to stdout.
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-paper}"
SESSION_S="${SESSION_S:-480}"
STEP_ECHO="^($PRESET) "  # the step table's data row, the conv3d rows and the loader row
source bench/gpu_steps.sh  # OUT, TMP, STARTED, PY, KP and step()

$PY -c "import torch, platform; print(platform.python_version(), torch.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tee -a "$OUT/session.log"
step synth 60 $KP synth "$TMP/small" --cases 6 --size small

BENCH="$PY bench/train_step.py --device $DEVICE --quick --no-nnunet --results $OUT/results.jsonl --presets $PRESET
       --data $TMP/small"
FAST="--amp --channels-last --compile"
# 1. cuDNN's timed algorithms against the deterministic ones (session 5's setting), compiled bf16
step compiled_bf16_timed 150 $BENCH $FAST --deterministic off
step compiled_bf16_deterministic 100 $BENCH $FAST --deterministic on
# 2. batch 4: more work per kernel for the small 4 mm and deep 1 mm levels
step compiled_bf16_timed_batch4 100 $BENCH $FAST --deterministic off --batch-size 4
# 3. uncompiled bf16 with the profile of one step, and float32 (session 5: 37 % and 64 %)
step eager_bf16_timed_profile 60 $BENCH --amp --channels-last --deterministic off --profile
grep -A 40 "torch.profiler" "$TMP/eager_bf16_timed_profile.out" > "$OUT/profile.txt" 2>/dev/null
step eager_fp32_timed 60 $BENCH --deterministic off
# 4. the real training path with the plan's defaults on this device (deterministic auto)
train_tiny() {
    set -e
    $KP fingerprint "$TMP/small" --work "$TMP/work"
    $KP plan "$TMP/work" --preset cpu
    $KP preprocess "$TMP/work" -j 4
    $KP train "$TMP/work" --fold 0 --epochs 1 --device "$DEVICE" --mixed-precision bf16 --max-minutes 0.5
}
export -f train_tiny
export TMP KP DEVICE
step kitspipe_train_auto 90 bash -c train_tiny
grep -h -E "deterministic|training fold" "$TMP/kitspipe_train_auto.out" 2>/dev/null | head -n 4
# 5. CUDA graphs through torch.compile (an exploration; may not work with this training step)
step compiled_bf16_timed_cudagraphs 100 $BENCH $FAST --deterministic off --compile-mode reduce-overhead
echo "== done in $(elapsed) s"
cat "$OUT/steps.tsv"
rm -rf "$TMP"

# Time-bounded steps for the one-session GPU scripts (bench/gpu_session.sh,
# bench/gpu_training_levers.sh); sourced from the repository root, not run. The caller sets
# SESSION_S (the session's budget in seconds) and may set OUT (what comes back, default ./gpu_out)
# and STEP_ECHO, an extended regex of the output lines to echo after each step (default: the
# last 4 lines). A lent machine returns only a few files, so every step's output is appended to
# one $OUT/session.log, and steps.tsv gets one line per step: name, exit code (or "skipped"), seconds.
# Both start afresh with each session; the benchmarks' results.jsonl in $OUT keeps appending.

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STARTED=$(date +%s)
TMP="$(mktemp -d /tmp/kitspipe-gpu-XXXXXX)"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
PY=python3
KP="$PY -m kitspipe --no-progress"
printf 'step\texit\tseconds\n' > "$OUT/steps.tsv"  # a new session starts both files afresh
: > "$OUT/session.log"

elapsed() { echo $(( $(date +%s) - STARTED )); }

# step NAME MAX_SECONDS COMMAND...: run COMMAND under a timeout of MAX_SECONDS or what is left of
# the session, whichever is less; a failing or timed-out step is recorded and never stops the caller.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$(( SESSION_S - $(elapsed) - 5 ))
    if (( left < 20 )); then
        printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
        echo "== $name: skipped, $(elapsed) s of ${SESSION_S} s used"
        return 0
    fi
    (( limit > left )) && limit=$left
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$TMP/$name.out" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
    { echo "===== $name (exit $rc, $(( $(date +%s) - t0 )) s)"; cat "$TMP/$name.out"; } >> "$OUT/session.log"
    echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s (at most ${limit} s)"
    if [[ -n "${STEP_ECHO:-}" ]] && (( rc == 0 )); then
        grep -E "$STEP_ECHO" "$TMP/$name.out" | head -n 8 | sed 's/^/   | /'
    else
        tail -n 4 "$TMP/$name.out" | sed 's/^/   | /'
    fi
    return 0
}

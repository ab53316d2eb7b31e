#!/usr/bin/env bash
# One prepared device check for isnet-fast: environment, the test suite on CUDA, fixture parity
# (float32, TF32 off) and the bench table (densenet121, 224x224, batch 16, 2 and 10 classes;
# eager fp32 NCHW, the authors' code when ISNET_REFERENCE is set, channels_last, bf16 autocast,
# torch.compile), in at most about 7.5 minutes, everything written into OUTDIR.
#
# Usage:
#   bash bench/gpu_check.sh OUTDIR            # on the GPU machine (the device session runs
#                                             #   pip install --no-deps -e . && bash bench/gpu_check.sh "$OUT/gpu-check"
#                                             #   with a timeout_s around 540)
#   bash bench/gpu_check.sh OUTDIR --smoke    # the same flow on the CPU, tiny sizes, about a minute
#   ISNET_REFERENCE=/path/to/ISNet bash bench/gpu_check.sh OUTDIR   # also time the original and the
#                                             #   authors' Selective ISNet (a checkout with backup/ and code/)
#
# The references on the device machine (nothing can be fetched there): their backup/ and code/
# go into .reference/, which .git/info/exclude ignores (never committed), and travel with the run:
#   mkdir -p .reference && git -C <mirror of PedroRASB/ISNet> archive HEAD backup code | tar -x -C .reference
#   grep -qx '/.reference/' .git/info/exclude || echo '/.reference/' >> .git/info/exclude
#   device run, carry [".reference"]:
#     pip install --no-deps -e . && ISNET_REFERENCE=.reference bash bench/gpu_check.sh "$OUT/gpu-check"
# Other options go to bench/gpu_check.py (--total-budget S, --test-budget S, --only STEP...,
# --fail-step STEP, --device, --compile-backend); see python bench/gpu_check.py --help.
#
# Output: OUTDIR/summary.md (read this first), steps.json (each step's status, time, log tail),
# environment.json, nvidia-smi.txt, parity.json, tests.json + junit.xml, bench.json and
# bench-<group>.jsonl (every case as measured), logs/<step>.log.
# Exit status: 0 every step passed (or was skipped for time), 1 a step failed, 2 the driver
# itself crashed or overran (a minimal summary.md is still written).
set -u

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
    exit 2
fi
OUTDIR=$1
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$HERE" || exit 2
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)

PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# The driver keeps to its own budget (450 s, smoke 150 s); this is the backstop.
LIMIT=510
for arg in "$@"; do
    [ "$arg" = "--smoke" ] && LIMIT=240
done

BACKSTOP=()
command -v timeout >/dev/null 2>&1 && BACKSTOP=(timeout -k 10 "$LIMIT")  # SIGTERM: the driver still reports

start=$(date +%s)
"${BACKSTOP[@]}" "$PYTHON" bench/gpu_check.py "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/gpu_check.log"
rc=${PIPESTATUS[0]}
elapsed=$(( $(date +%s) - start ))

if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then
    {
        echo ""
        echo "**gpu_check.py exited with $rc after ${elapsed} s** (124/137: stopped by the ${LIMIT} s backstop)."
        echo "Whatever the steps wrote is in $OUTDIR (steps.json, logs/). Last lines of its output:"
        echo ""
        echo '```'
        tail -n 30 "$OUTDIR/gpu_check.log"
        echo '```'
    } >> "$OUTDIR/summary.md"
    rc=2
fi
echo "gpu_check.sh: exit $rc after ${elapsed} s; summary in $OUTDIR/summary.md"
exit "$rc"

#!/usr/bin/env bash
# The GPU figures in one command: `softcache bench`, then benchmarks/gpu_suite.toml (ResNet-56 teacher, a
# cache, ResNet-20 students CE / KD / KD online / KD+AT / FitNets / SP / RKD / PKT / CRD / DKD / DIST / OFD, two seeds each),
# then OUT/suite.md (the bench table, the accuracy and cost tables) and OUT/runs/report.png, ready for
# BENCHMARKS.md.
#
#   benchmarks/gpu_suite.sh OUT [DATA]        DATA defaults to imagefolder:data/cifar10-jpeg
#
# Resumable: every stage skips what is finished (a killed stage continues from its last epoch or shard), so
# the suite can be spread over several calls of a time-limited machine; carry OUT back each time.
#   SUITE_BUDGET_S=540   stop the recipe after this many seconds (0, the default: no limit); rerun to go on
#   SUITE_DROP_CACHE=1   delete the cache at the end of the call (OUT stays small; a later call re-dumps)
#   SUITE_SET="k=v ..."  --set values for every stage (the CPU test: epochs=1 model=resnet8 ...)
#   SUITE_BENCH_ARGS=".." extra `softcache bench` options (the CPU test: a few small steps)
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_suite.sh OUT [DATA]}
DATA=${2:-imagefolder:data/cifar10-jpeg}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
device=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
echo "gpu_suite: $device, data $DATA, output $OUT"

if [ ! -s "$OUT/bench.txt" ]; then
    echo "gpu_suite: softcache bench"
    # shellcheck disable=SC2086  # SUITE_BENCH_ARGS is a list of options
    softcache -q bench --data "$DATA" --out "$OUT/bench" ${SUITE_BENCH_ARGS:-} > "$OUT/bench.txt.partial"
    mv "$OUT/bench.txt.partial" "$OUT/bench.txt"
    find "$OUT/bench" -mindepth 1 -maxdepth 1 ! -name bench.json -exec rm -rf {} +  # its caches; bench.json stays
fi

sets=(--set "data=$DATA")
for item in ${SUITE_SET:-}; do sets+=(--set "$item"); done
budget=${SUITE_BUDGET_S:-0}
echo "gpu_suite: softcache run $HERE/gpu_suite.toml (progress: $OUT/progress.log)"
status=0
timeout --signal=TERM "$budget" softcache run "$HERE/gpu_suite.toml" --root "$OUT/runs" "${sets[@]}" \
    > "$OUT/run.log" 2> "$OUT/progress.log" || status=$?
if [ "$status" -ne 0 ]; then
    tail -n 3 "$OUT/progress.log" >&2
    if [ "$status" -eq 124 ]; then
        echo "gpu_suite: stopped after ${budget} s; run the same command again (with $OUT) to continue" >&2
    else
        echo "gpu_suite: softcache run failed (exit $status); see $OUT/progress.log" >&2
    fi
    softcache -q report "$OUT/runs" > /dev/null 2>&1 || true  # what is finished so far
fi

{
    echo "# softcache GPU suite: $device"
    echo
    echo "$(date -u +%Y-%m-%d), data \`$DATA\`, recipe \`benchmarks/gpu_suite.toml\`$([ -n "${SUITE_SET:-}" ] && echo ", --set ${SUITE_SET}")."
    [ "$status" -eq 0 ] || echo "**Incomplete**: the recipe stopped (exit $status); the tables hold the finished runs."
    echo
    echo "## softcache bench"
    echo
    echo '```'
    cat "$OUT/bench.txt"
    echo '```'
    echo
    if [ -s "$OUT/runs/report.md" ]; then
        sed -e '1d' -e 's/^## /### /' "$OUT/runs/report.md"
        echo
        echo "![report](runs/report.png)"
    fi
} > "$OUT/suite.md"
if [ "${SUITE_DROP_CACHE:-0}" = 1 ]; then rm -rf "$OUT/runs/cache" "$OUT/runs/cache.lock"; fi
echo "gpu_suite: $OUT/suite.md"
exit "$status"

#!/usr/bin/env bash
# One device call: GPU parity tests, `blackmamba bench` on the released shapes, and the PyTorch
# baseline, all logs under $OUT. Run from a folder holding blackmamba.xz, gpu_parity.xz (the
# release binary and test executable of a `--features cuda` build) and torch_baseline.py:
#   bash gpu_run.sh [quick]
# No cargo on the GPU machine: everything is built beforehand.
set -u
cd "$(dirname "$0")"
export BM_FIXTURE_DIR=$PWD/tiny-a
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export RUST_BACKTRACE=1
for f in *.xz; do xz -d -f -k "$f"; done
chmod +x blackmamba gpu_parity
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv | tee "$OUT/smi.txt"

log "parity tests"
timeout 240 ./gpu_parity --test-threads=1 2>&1 | tee "$OUT/tests.log" | grep -E "^test |test result|panicked|FAILED" | tee -a "$OUT/summary.txt"

bench() { # name, args...
    local name=$1
    shift
    log "bench $name: blackmamba bench $*"
    timeout 200 ./blackmamba bench "$@" > "$OUT/bench_$name.txt" 2> "$OUT/bench_$name.err"
    echo "rc=$?" >> "$OUT/bench_$name.err"
    cat "$OUT/bench_$name.txt" | tee -a "$OUT/summary.txt"
    tail -3 "$OUT/bench_$name.err" | tee -a "$OUT/summary.txt"
}
bench 28 --model random:2.8b --device cuda --dtype bf16 --prompt-len 2048 --gen-len 1024 --step-tokens 32 --slow-prefill
bench 15 --model random:1.5b --device cuda --dtype bf16 --prompt-len 2048 --gen-len 1024 --step-tokens 32
bench 28b8 --model random:2.8b --device cuda --dtype bf16 --prompt-len 2048 --prefill-batch 8 --gen-len 64 --modes graph
if [ "${1:-}" != quick ]; then
    bench 28long --model random:2.8b --device cuda --dtype bf16 --prompt-len 2048 --gen-len 16384 --modes graph
    bench 28sweep --model random:2.8b --device cuda --dtype bf16 --prompt-len 64 --gen-len 128 --modes graph --sweep
fi

log "torch baseline"
for s in 2.8b 1.5b; do
    PYTHONUNBUFFERED=1 timeout 200 python3 torch_baseline.py --shape $s --gen-len 256 --eager-len 32 2>&1 | tee -a "$OUT/summary.txt"
done
log "done"

#!/usr/bin/env bash
# One device call: GPU parity tests, `blackmamba bench` on the released shapes, and the PyTorch
# baseline, logs under $OUT. Run from a folder holding blackmamba.xz, gpu_parity.xz (the release
# binary and test executable of a `--features cuda` build), torch_baseline.py, torch_finetune.py
# and tiny-a/ (the fixture):
#   bash gpu_run.sh tune      tests, benches with per-kernel profiles, launch-shape sweep
#   bash gpu_run.sh ftprof    tests, bench --finetune with phase profiles (2.8B, seq 2048)
#   bash gpu_run.sh ftfinal   tests, bench --finetune (LoRA batch 8, every weight batch 1 and 4) and
#                             the same three steps in PyTorch, one run
#   bash gpu_run.sh final     tests, benches (every decode mode, prefill at batch 1 and 8), 16k-token
#                             memory run, PyTorch baseline (the sweeps: tune, stage, persistent)
#   bash gpu_run.sh moe       tests, prefill with the batched expert products beside --per-expert
#                             (2.8B and 1.5B, batch 1 and 8), decode graph / pipelined
#   bash gpu_run.sh final3    tests, decode (graph, pipelined) and prefill benches with the PyTorch
#                             decode baseline, 16k-token memory run, bench --finetune (LoRA batch 8,
#                             every weight batch 1 and 4): the numbers of the README, one call
#   bash gpu_run.sh finetune       `bench --finetune` on 2.8B shapes, seq 2048, LoRA on all
#                                  targets at batch 8, and the same step in PyTorch
#   bash gpu_run.sh finetune-full  the same with every weight trained, batch 1 and 4
#   bash gpu_run.sh s6tests   tests, and the transformer-MoE fixtures (moe_fixtures.py) on the CPU
#   bash gpu_run.sh s6bench   (no tests) decode on the user's path ...; s6: tests, then the same:
#   bash gpu_run.sh s7        tests (moe_fixtures.py beside them on the CPU), then the user's path
#                             with the host sampler and with --device-sampler, 2.8B and 1.5B, then
#                             every carried *_gpu test binary (megakernel_gpu first, if carried)
#   bash gpu_run.sh s6        tests, then decode on the user's path (bench --path user, and the
#                             `generate` command) beside the bare decoder (graph), this build and
#                             the previous one (blackmamba-base.xz) in the same call, and the
#                             PyTorch decode baseline
# (the finetune phases skip the parity tests, to stay within one call's 10 minutes)
# Carry: stripped, `xz`-compressed binaries in a git-ignored folder named in the call's carry. The
# tree travels too (~31 MB, 20 MB of it the embedded model), so for two binaries plus a test binary
# in one call, build them with assets/default/model.safetensors swapped for an empty safetensors
# file (the benches use random weights) and put the real file back afterwards (~10 MB each).
# Every GPU test fails instead of skipping when it finds no GPU (BLACKMAMBA_REQUIRE_GPU=1).
# No cargo on the GPU machine: everything is built beforehand.
set -u
PHASE=${1:-final}
cd "$(dirname "$0")"
export BM_FIXTURE_DIR=$PWD/tiny-a
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export RUST_BACKTRACE=1
export BLACKMAMBA_REQUIRE_GPU=1
for f in *.xz; do xz -d -f -k "$f"; done
chmod +x blackmamba blackmamba-base gpu_parity *_gpu 2>/dev/null
S=$OUT/summary.txt
R=/tmp/raw
mkdir -p $R
log() { echo "== $*" | tee -a "$S"; }
moe_fixtures() { # the transformer-MoE golden fixtures (scripts/moe_fixtures.py), on this machine's CPU
    [ -f moe_fixtures.py ] || return 0
    log "moe_fixtures.py"
    rm -rf /tmp/fx && PYTHONUNBUFFERED=1 timeout 240 python3 moe_fixtures.py --out /tmp/fx 2>&1 | tail -20 | tee -a "$S"
    tar -C /tmp/fx -cf "$OUT/moe_fixtures.tar" . 2>&1 | tee -a "$S"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv,noheader | tee -a "$S"

if [ "$PHASE" = s7 ]; then # the fixtures on the CPU beside the GPU work
    ( moe_fixtures ) > /tmp/fx.log 2>&1 &
    FXPID=$!
fi
if [ "${PHASE#finetune}" = "$PHASE" ] && [ "$PHASE" != s6bench ]; then
    log "parity tests"
    [ -x gpu_parity ] && timeout "${TEST_TIMEOUT:-150}" ./gpu_parity --test-threads=1 2>&1 | tee "$OUT/tests.log" | grep -E "^test |test result|panicked|FAILED|fixture bf16|assert|Δ|left|right" | tee -a "$S"
    for t in *_gpu; do # the other CUDA-only test binaries carried along (tests/*_gpu.rs)
        [ -x "$t" ] && [ "$PHASE" != s7 ] && [ "$PHASE" != s8 ] || continue # s7 runs them after its benches
        log "$t"
        timeout 60 "./$t" --test-threads=1 2>&1 | tee -a "$OUT/tests.log" | grep -E "^test |test result|panicked|FAILED" | tee -a "$S"
    done
fi

bench() { # name, args... (BIN= another binary)
    local name=$1
    shift
    log "${BIN:-./blackmamba} bench $*"
    timeout "${BENCH_TIMEOUT:-100}" "${BIN:-./blackmamba}" bench "$@" > "$R/b_$name.txt" 2> "$R/b_$name.err"
    echo "rc=$?" >> "$R/b_$name.err"
    cat "$R/b_$name.txt" >> "$S"
    grep -v "^loaded" "$R/b_$name.err" >> "$S"
}
M28="--model random:2.8b --device cuda --dtype bf16"
M15="--model random:1.5b --device cuda --dtype bf16"
if [ "$PHASE" = ftprof ]; then
    BENCH_TIMEOUT=150
    FT="--finetune $M28 --seq-len 2048 --steps 2 --profile"
    bench ft28full1 $FT --batch 1 --method full
    bench ft28full1keep $FT --batch 1 --method full --recompute off
    bench ft28lora8 $FT --batch 8
    bench ft28full4 $FT --batch 4 --method full
elif [ "$PHASE" = ftfinal ]; then
    BENCH_TIMEOUT=200
    FT="--finetune $M28 --seq-len 2048"
    tf() {
        log "torch_finetune.py $*"
        PYTHONUNBUFFERED=1 timeout 240 python3 torch_finetune.py "$@" 2>&1 | tail -4 | tee -a "$S"
    }
    bench ft28lora8 $FT --batch 8 --profile
    bench ft28full1 $FT --batch 1 --method full --profile
    bench ft28full4 $FT --batch 4 --method full --profile
    tf --shape 2.8b --seq-len 2048 --batch 8 --steps 3
    tf --shape 2.8b --seq-len 2048 --batch 1 --method full --steps 3
    tf --shape 2.8b --seq-len 2048 --batch 4 --method full --steps 3
elif [ "$PHASE" = s6quick ]; then # the tests above, then the user's path against the kernels, new and old binary
    bench 28new $M28 --prompt-len 2048 --gen-len 512 --reps 1 --modes graph,user
    [ -x blackmamba-base ] && BIN=./blackmamba-base bench 28old $M28 --prompt-len 2048 --gen-len 512 --reps 1 --modes graph
elif [ "$PHASE" = s7 ]; then # the user's path: host sampler (default) vs --device-sampler, one binary
    G=1024 && [ -n "${S7_SHORT:-}" ] && G=512
    bench 28 $M28 --prompt-len 2048 --gen-len $G --reps 2 --modes graph,user
    bench 28ds $M28 --prompt-len 2048 --gen-len $G --reps 2 --modes user --device-sampler
    P="$(cat prompt.txt 2>/dev/null)"
    for ds in "" --device-sampler; do
        log "blackmamba generate --model random:2.8b --device cuda --dtype bf16 --max-tokens $G $ds (prompt.txt)"
        timeout 100 ./blackmamba generate --model random:2.8b --device cuda --dtype bf16 --max-tokens $G $ds --prompt "$P" 2>&1 >/dev/null | tail -2 | tee -a "$S"
    done
    [ -n "${S7_SHORT:-}" ] && rm -f ./*_gpu # short call: 2.8B only, no training tests
    [ -z "${S7_SHORT:-}" ] && bench 15 $M15 --prompt-len 2048 --gen-len 1024 --reps 2 --modes graph,user
    [ -z "${S7_SHORT:-}" ] && bench 15ds $M15 --prompt-len 2048 --gen-len 1024 --reps 2 --modes user --device-sampler
    for t in *_gpu; do
        [ -x "$t" ] || continue
        log "$t"
        timeout 60 "./$t" --test-threads=1 2>&1 | tee -a "$OUT/tests.log" | grep -E "^test |test result|panicked|FAILED" | tee -a "$S"
    done
    wait $FXPID; cat /tmp/fx.log >> "$S"
elif [ "$PHASE" = s8 ]; then # the user path (device sampler by default, --host-sampler twin) beside blackmamba-base, quant, megakernel
    bench 28 $M28 --prompt-len 2048 --gen-len 512 --reps 2 --modes graph,user
    bench 28hs $M28 --prompt-len 2048 --gen-len 512 --reps 2 --modes user --host-sampler
    [ -x blackmamba-base ] && BIN=./blackmamba-base bench 28old $M28 --prompt-len 2048 --gen-len 512 --reps 2 --modes graph
    P="$(cat prompt.txt 2>/dev/null)"
    for b in "blackmamba" "blackmamba --host-sampler" "blackmamba-base"; do
        set -- $b
        [ -x "$1" ] || continue
        log "$b generate --model random:2.8b --device cuda --dtype bf16 --max-tokens 512 (prompt.txt)"
        timeout 100 ./$1 generate --model random:2.8b --device cuda --dtype bf16 --max-tokens 512 ${2:-} --prompt "$P" 2>&1 >/dev/null | tail -2 | tee -a "$S"
    done
    bench 15 $M15 --prompt-len 2048 --gen-len 512 --reps 2 --modes graph,user
    [ -x blackmamba-base ] && BIN=./blackmamba-base bench 15old $M15 --prompt-len 2048 --gen-len 512 --reps 2 --modes graph
    log "quant_gpu"
    [ -x quant_gpu ] && timeout 90 ./quant_gpu --test-threads=1 2>&1 | tee -a "$OUT/tests.log" | grep -E "^test |test result|panicked|FAILED|assert|left|right" | head -40 | tee -a "$S"
    bench 28i8 $M28 --quant int8 --prompt-len 2048 --gen-len 512 --reps 2 --modes graph,graph-dense,user
    bench 28q4 $M28 --quant q4 --quant-keep fc2 --prompt-len 2048 --gen-len 512 --reps 2 --modes graph,user
    log "megakernel_gpu"
    [ -x megakernel_gpu ] && timeout 90 ./megakernel_gpu --test-threads=1 --nocapture 2>&1 | tee "$OUT/mk.log" | grep -E "^test |test result|panicked|FAILED|error|Δ|mismatch" | head -60 | tee -a "$S"
    BENCH_TIMEOUT=60 bench 28mk $M28 --prompt-len 2048 --gen-len 512 --reps 2 --modes mega
    log "torch baseline"
    PYTHONUNBUFFERED=1 timeout 100 python3 torch_baseline.py --shape 2.8b --gen-len 256 --eager-len 32 2>&1 | tail -6 | tee -a "$S"
    for t in *_gpu; do
        [ -x "$t" ] && [ "$t" != megakernel_gpu ] && [ "$t" != quant_gpu ] || continue
        log "$t"
        timeout 90 "./$t" --test-threads=1 2>&1 | tee -a "$OUT/tests.log" | grep -E "^test |test result|panicked|FAILED" | tee -a "$S"
    done
elif [ "$PHASE" = s6tests ]; then
    moe_fixtures
elif [ "$PHASE" = s6 ] || [ "$PHASE" = s6bench ]; then
    [ "$PHASE" = s6 ] && moe_fixtures
    for m in 28 15; do
        eval "M=\$M$m"
        bench ${m}new $M --prompt-len 2048 --gen-len 1024 --reps 3 --modes graph,user,graph-probe
        [ -x blackmamba-base ] && BIN=./blackmamba-base bench ${m}old $M --prompt-len 2048 --gen-len 1024 --reps 3 --modes graph,graph-probe
    done
    # the user's own command, default sampling, 1,024 tokens after a ~2k-token prompt
    P="$(cat prompt.txt 2>/dev/null)"
    for b in blackmamba blackmamba-base; do
        [ -x $b ] || continue
        log "$b generate --model random:2.8b --device cuda --dtype bf16 --max-tokens 1024 (prompt.txt)"
        timeout 150 ./$b generate --model random:2.8b --device cuda --dtype bf16 --max-tokens 1024 --prompt "$P" 2>&1 >/dev/null | tail -2 | tee -a "$S"
    done
    log "torch baseline"
    PYTHONUNBUFFERED=1 timeout 150 python3 torch_baseline.py --shape 2.8b --gen-len 256 --eager-len 32 2>&1 | tee -a "$S"
elif [ "$PHASE" = final3 ]; then
    bench 28 $M28 --prompt-len 2048 --gen-len 1024 --reps 5 --modes graph,pipelined,graph-probe --profile
    BENCH_TIMEOUT=150
    FT="--finetune $M28 --seq-len 2048 --steps 3 --warmup-steps 1 --profile"
    bench ft28lora8 $FT --batch 8
    bench ft28full1 $FT --batch 1 --method full
    bench ft28full4 $FT --batch 4 --method full
    BENCH_TIMEOUT=100
    bench 15 $M15 --prompt-len 2048 --gen-len 1024 --reps 5 --modes graph,pipelined,graph-probe --profile
    bench 28b8 $M28 --prompt-len 2048 --prefill-batch 8 --reps 3 --gen-len 64 --modes graph
    bench 15b8 $M15 --prompt-len 2048 --prefill-batch 8 --reps 3 --gen-len 64 --modes graph
    log "torch baseline"
    for s in 2.8b 1.5b; do
        PYTHONUNBUFFERED=1 timeout 120 python3 torch_baseline.py --shape $s --gen-len 256 --eager-len 32 2>&1 | tee -a "$S"
    done
    bench 28long $M28 --prompt-len 2048 --gen-len 16384 --modes graph
elif [ "$PHASE" = moe ]; then
    for m in 28 15; do
        eval "M=\$M$m"
        bench ${m} $M --prompt-len 2048 --gen-len 512 --reps 7 --modes graph,pipelined --profile
        bench ${m}pe $M --prompt-len 2048 --gen-len 64 --reps 7 --modes graph --per-expert --profile
        bench ${m}b8 $M --prompt-len 2048 --prefill-batch 8 --reps 5 --gen-len 64 --modes graph
        bench ${m}b8pe $M --prompt-len 2048 --prefill-batch 8 --reps 5 --gen-len 64 --modes graph --per-expert
    done
elif [ "$PHASE" = tune ]; then
    bench 28 $M28 --prompt-len 2048 --gen-len 512 --step-tokens 16 --profile
    bench 15 $M15 --prompt-len 2048 --gen-len 512 --step-tokens 16 --profile
    bench 28sw $M28 --prompt-len 64 --gen-len 128 --modes graph --sweep
elif [ "${PHASE#finetune}" != "$PHASE" ]; then
    BENCH_TIMEOUT=240
    FT="--finetune $M28 --seq-len 2048"
    tf() {
        log "torch_finetune.py $*"
        PYTHONUNBUFFERED=1 timeout 240 python3 torch_finetune.py "$@" 2>&1 | tail -5 | tee -a "$S"
    }
    if [ "$PHASE" = finetune ]; then
        log "torch_finetune.py self-test (CPU)"
        timeout 60 python3 torch_finetune.py --check 2>&1 | grep -E "FAILED|lowers|Error" | tee -a "$S"
        bench ft28lora8 $FT --batch 8 --profile
        tf --shape 2.8b --seq-len 2048 --batch 8
    else
        bench ft28full1 $FT --batch 1 --method full --steps 3
        bench ft28full4 $FT --batch 4 --method full --steps 3
        tf --shape 2.8b --seq-len 2048 --batch 1 --method full --steps 3
        tf --shape 2.8b --seq-len 2048 --batch 4 --method full --steps 3
    fi
else
    bench 28 $M28 --prompt-len 2048 --gen-len 1024 --step-tokens 32 --profile
    bench 15 $M15 --prompt-len 2048 --gen-len 1024 --step-tokens 32 --profile
    bench 28b8 $M28 --prompt-len 2048 --prefill-batch 8 --gen-len 64 --modes graph
    bench 15b8 $M15 --prompt-len 2048 --prefill-batch 8 --gen-len 64 --modes graph
    bench 28long $M28 --prompt-len 2048 --gen-len 16384 --modes graph
    log "torch baseline"
    for s in 2.8b 1.5b; do
        PYTHONUNBUFFERED=1 timeout 200 python3 torch_baseline.py --shape $s --gen-len 256 --eager-len 32 2>&1 | tee -a "$S"
    done
fi
log "done"

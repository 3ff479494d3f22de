#!/usr/bin/env bash
# Reproduces the embedded default model (assets/default) and its dense baseline from the corpus
# that scripts/fetch-corpus.sh fetches. Fixed seeds; every step's metrics land in OUT/*/metrics.jsonl.
#
#   scripts/train-default.sh [BIN] [OUT]
#
# BIN defaults to target/release/blackmamba (build it with --features cuda to train on a GPU);
# OUT defaults to runs/default. Settings (environment): DEVICE (cuda), STEPS (pretraining steps),
# CHAT_STEPS, SEQ (256), BATCH (32), LR (3e-3), CHAT_LR (1e-3), CORPUS (data/corpus).
# The values that made assets/default are the defaults below; the model card quotes them.
set -euo pipefail
BIN=${1:-target/release/blackmamba}
OUT=${2:-runs/default}
CORPUS=${CORPUS:-data/corpus}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-1500}
CHAT_STEPS=${CHAT_STEPS:-200}
SEQ=${SEQ:-256}
BATCH=${BATCH:-32}
LR=${LR:-3e-3}
CHAT_LR=${CHAT_LR:-5e-4}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
[[ -f $CORPUS/prose.txt ]] || "$HERE/fetch-corpus.sh" "$CORPUS"

# 1. tokenizer: byte-level BPE, 8,192 ids, on the prose and the chat text
TOK=$OUT/tokenizer.json
[[ -f $TOK ]] || "$BIN" train-tokenizer --input "$CORPUS/prose.txt" --input "$CORPUS/chat.txt" --vocab-size 8192 --out "$TOK"

common=(--tokenizer "$TOK" --device "$DEVICE" --dtype f32 --seq-len "$SEQ" --batch "$BATCH" --seed 1)
pretrain() { # name config
  [[ -f $OUT/$1/model.safetensors ]] && return
  "$BIN" train --config "$HERE/default-model/$2.json" --data "$CORPUS/prose.txt" --eval-data "$CORPUS/prose_eval.txt" \
    --steps "$STEPS" --lr "$LR" --warmup 100 --eval-every 250 --eval-max 256 "${common[@]}" --out "$OUT/$1"
}

# 2. pre-training on the prose: the MoE model and, with the same data, steps and tokens, the
#    dense baseline of equal active parameters (each MoE layer one MLP of an expert's width)
pretrain moe-pretrain moe
[[ ${SKIP_DENSE:-0} == 1 ]] || pretrain dense-pretrain dense

# 3. chat: full fine-tuning of the MoE model on the conversations, in the TUI's chat template,
#    interleaved with as many prose passages so that it keeps its prose
if [[ ! -f $OUT/moe-chat/model.safetensors ]]; then
  "$BIN" finetune --model "$OUT/moe-pretrain" --method full --data "$CORPUS/chat_mix.jsonl" --eval-data "$CORPUS/chat_eval.jsonl" \
    --steps "$CHAT_STEPS" --lr "$CHAT_LR" --warmup 20 --eval-every 100 --tokenizer "$TOK" --device "$DEVICE" --dtype f32 \
    --seq-len 128 --batch "$BATCH" --seed 1 --out "$OUT/moe-chat"
fi

# 4. the shipped files: bf16 matrices (A_log, D, norms, routers, conv stay f32)
"$BIN" merge --model "$OUT/moe-chat" --tokenizer "$TOK" --device cpu --save-dtype bf16 --out "$OUT/default"
cp "$TOK" "$OUT/default/tokenizer.json"

# 5. held-out losses for the model card (greedy routing, as at inference)
for m in moe-pretrain dense-pretrain default; do
  [[ -d $OUT/$m ]] || continue
  echo "== $m on held-out prose"; "$BIN" eval --model "$OUT/$m" --tokenizer "$TOK" --device "$DEVICE" --data "$CORPUS/prose_eval.txt" --seq-len "$SEQ"
done
echo "== default on held-out chat"; "$BIN" eval --model "$OUT/default" --tokenizer "$TOK" --device "$DEVICE" --data "$CORPUS/chat_eval.jsonl"
echo "train-default: done; copy $OUT/default/{config.json,model.safetensors,tokenizer.json} to assets/default/"

#!/usr/bin/env bash
# ncu, one metric (kernel duration), every kernel of `bench --finetune` (1 warm-up + 1 timed step)
cd "$(dirname "$0")"  # a folder holding blackmamba.xz (a --features cuda build)
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64
xz -d -f -k blackmamba.xz && chmod +x blackmamba
timeout 300 ./blackmamba bench --finetune --model random:2.8b --device cuda --dtype bf16 --seq-len 2048 --batch 8 --steps 1 --warmup-steps 1 --profile > $OUT/plain.txt 2>&1
timeout 420 /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --cache-control none --clock-control none \
  --csv --page raw --print-units base ./blackmamba bench --finetune --model random:2.8b --device cuda --dtype bf16 \
  --seq-len 2048 --batch 8 --steps 1 --warmup-steps 1 > $OUT/ncu_ft.csv 2> $OUT/ncu_ft.err
echo "ncu rc=$?" >> $OUT/ncu_ft.err
xz -T8 -f $OUT/ncu_ft.csv

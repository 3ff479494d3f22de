#!/usr/bin/env bash
# ncu over one decode token's kernels (2.8B shapes, eager mode) -> $OUT/ncu.csv
cd "$(dirname "$0")"  # a folder holding blackmamba.xz (a --features cuda build)
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64
xz -d -f -k blackmamba.xz && chmod +x blackmamba
K='regex:in_proj_conv|gemv_|moe_fc1|ssm_step|conv_xproj|head_|embed_'
timeout 400 /usr/local/cuda/bin/ncu -k "$K" --launch-skip 333 --launch-count 112 \
  --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
  --csv --page details ./blackmamba bench --model random:2.8b --device cuda --dtype bf16 \
  --prompt-len 16 --gen-len 8 --modes eager --reps 1 > $OUT/ncu.csv 2> $OUT/ncu.err
echo "ncu rc=$?" >> $OUT/ncu.err

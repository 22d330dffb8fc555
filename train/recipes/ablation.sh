#!/usr/bin/env bash
# The paper's ablation (A baseline, B +DEM, C +knowledge transfer, D +contrastive regularisation) and
# RED-CNN, each with the same short budget on the same data: 1200 random 64² patches, batch 8.
# Usage: bash train/recipes/ablation.sh WORK_DIR   (after shipped-weights.sh WORK_DIR made the data and teacher)
set -euo pipefail
work=$(realpath "${1:?usage: ablation.sh WORK_DIR}")
budget=(--data "$work/pairs.toml" --workers 1 --seed 1 --patch-size 64 --batch-size 8 --patches-per-epoch 1200
        --epochs 1 --lr 3e-4)
for variant in A B; do
    ldct-node train student "${budget[@]}" --variant "$variant" --width 16 --in-slices 3 --out "$work/ablation-$variant"
done
ldct-node train student "${budget[@]}" --variant C --teacher "$work/teacher/best.safetensors" --out "$work/ablation-C"
# D at the shipped contrastive weight (see shipped-weights.sh for why not the paper's 1e-3).
ldct-node train student "${budget[@]}" --variant D --teacher "$work/teacher/best.safetensors" --w-contrast 1e-5 \
    --out "$work/ablation-D"
ldct-node train redcnn "${budget[@]}" --in-slices 3 --out "$work/ablation-redcnn"

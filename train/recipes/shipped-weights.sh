#!/usr/bin/env bash
# How the earlier weights tscnet-student-v1 (1.0.0, replaced by v2; in git history) were made, on a 2-core CPU without a GPU (its model card is in git history).
# Usage: bash train/recipes/shipped-weights.sh WORK_DIR   (../shared/data/pancreas-ct-cb001 must exist)
set -euo pipefail
work=$(realpath -m "${1:?usage: shipped-weights.sh WORK_DIR}")
nd=$(realpath "$(dirname "$0")/../../../shared/data/pancreas-ct-cb001")
mkdir -p "$work"

# 5 % dose, simulated in the projection domain with the default flux and electronic noise.
ldct-node simulate "$nd" "$work/ld5" --dose 0.05 --seed 1

# One public patient: contiguous slabs with 12 mm gaps stand in for a patient-level split.
cat > "$work/pairs.toml" <<TOML
[[pair]]
patient = "Pancreas-CT-CB_001"
low = "ld5"
normal = "$nd"
split = "train"
slices = [0, 96]

[[pair]]
patient = "Pancreas-CT-CB_001"
low = "ld5"
normal = "$nd"
split = "val"
slices = [100, 112]

[[pair]]
patient = "Pancreas-CT-CB_001"
low = "ld5"
normal = "$nd"
split = "test"
slices = [116, 134]
TOML

common=(--data "$work/pairs.toml" --workers 1 --seed 1)
ldct-node train teacher "${common[@]}" --out "$work/teacher" --width 16 --in-slices 3 \
    --patch-size 64 --batch-size 8 --patches-per-epoch 480 --epochs 3 --milestones 2 --lr 2e-4
# The contrastive weight is 1e-5, not the paper's 1e-3: on this input scaling (HU over 4096 to [0, 1])
# the smooth-L1 term is ~1e-4, and 1e-3 x L_C dominated the loss (equal-budget ablation: 33.3 dB
# validation PSNR at 1e-3, 38.1 dB at 1e-5, 39.2 dB without the term).
ldct-node train student "${common[@]}" --variant D --teacher "$work/teacher/best.safetensors" --w-contrast 1e-5 \
    --out "$work/student-D" --patch-size 96 --batch-size 8 --patches-per-epoch 1600 --epochs 2 --milestones 1 --lr 3e-4 \
    --version-tag 1.0.0

#!/usr/bin/env bash
# How weights/tscnet-student-v2 (2.1.0) was made: two fine-tuning stages on top of 2.0.0
# (train/recipes/student-v2.sh), with the noise-weighted pixel loss, on the same 2-core CPU.
# Usage: bash train/recipes/student-v2.1.sh DATA_ROOT WORK_DIR
#   DATA_ROOT and WORK_DIR as for student-v2.sh, which this runs first when WORK_DIR lacks its output.
set -euo pipefail
here=$(dirname "$(realpath "$0")")
root=$(realpath "${1:?usage: student-v2.1.sh DATA_ROOT WORK_DIR}")
work=$(realpath -m "${2:?usage: student-v2.1.sh DATA_ROOT WORK_DIR}")
[ -f "$work/student/best.safetensors" ] || bash "$here/student-v2.sh" "$root" "$work"

# 2.0.0's architecture, teacher and bank; only the loss, the clean share and the schedule change.
arch=(--in-slices 1 --width 16 --num-dems 2 --highpass-sigma 6 --attention-window 25)
common=(--data "$work/bank" --workers 1 --patch-size 96 --batch-size 16 --smooth-l1-beta 0.01 "${arch[@]}"
        --variant C --teacher "$work/teacher/best.safetensors" --w-kt 0.1 --patches-per-epoch 3200 --epochs 10 --milestones 5,8)

# Stage 1: each sample's pixel loss divided by the noise power of its input (floored at a 10 HU SD).
# Unweighted, 2.0.0 spent its capacity on the heaviest noise and smoothed nearly clean input: at 50 %
# dose it scored below the input itself, and it changed a clean slice by twice its own noise.
[ -f "$work/ft1/last.state.pt" ] || OMP_NUM_THREADS=1 ldct-node train student "${common[@]}" --seed 5 \
    --init "$work/student/best.safetensors" --out "$work/ft1" --lr 2.5e-4 --clean-fraction 0.15 --noise-weighted 10 \
    --version-tag 2.1.0-stage1

# Stage 2 (2.1.0): a lower rate, a quarter of the samples left clean and the floor lowered to a 7 HU SD,
# so a clean scan weighs more: a normal-dose slice then changes by less than its own noise.
[ -f "$work/ft2/last.state.pt" ] || OMP_NUM_THREADS=1 ldct-node train student "${common[@]}" --seed 6 \
    --init "$work/ft1/best.safetensors" --out "$work/ft2" --lr 1.25e-4 --clean-fraction 0.25 --noise-weighted 7 \
    --version-tag 2.1.0
echo "2.1.0: $work/ft2/best.safetensors"

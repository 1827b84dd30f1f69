#!/usr/bin/env bash
# The seed head's ablation (issue 17): fine-tune the bundled model with and without the seed
# head at an equal budget (same data, crops, batch, steps, learning rate, seed and diameter),
# sweep the seed head's thresholds on a quarter of `train` (a fold) and on `val`, then score
# both models with `cellwatch evaluate` on `val`. Defaults: the CPU run of docs/model.md
# (8 × 100 steps of 4 crops of 160 px at 15 px nuclei, about 15 minutes each on 2 cores).
#
#   scripts/seed-head-ablation.sh
#   EPOCHS=16 STEPS=250 BATCH=16 CROP=256 KERAS_BACKEND=jax WORKERS=7 scripts/seed-head-ablation.sh  # a GPU
#
# The two fine-tunes run side by side. Each model's card records its exact `cellwatch train`
# command. `cellwatch evaluate` uses the default config (config.yaml's postprocess keys).
set -euo pipefail
DATA=${DATA:-../shared/data/dsb2018-fluo}
RUNS=${RUNS:-runs/seed-head}
DIAMETER=${DIAMETER:-15}
EPOCHS=${EPOCHS:-8}
STEPS=${STEPS:-100}
BATCH=${BATCH:-4}
CROP=${CROP:-160}
RATE=${RATE:-3e-4}
SEED=${SEED:-7}
WORKERS=${WORKERS:-1}
PYTHON=${PYTHON:-python3}
BUNDLED=cellwatch/models/cellwatch-nuclei.keras
T="$DATA/train" V="$DATA/val"
mkdir -p "$RUNS"

train() {  # train NAME [train options...]
    local name=$1
    shift
    $PYTHON -m cellwatch train --images "$T/images" --masks "$T/masks" \
        --val-images "$V/images" --val-masks "$V/masks" --out "$RUNS/$name.keras" \
        --from "$BUNDLED" --diameter "$DIAMETER" --crop "$CROP" --batch-size "$BATCH" \
        --epochs "$EPOCHS" --steps "$STEPS" --learning-rate "$RATE" --seed "$SEED" \
        --workers "$WORKERS" "$@" >"$RUNS/$name.log" 2>&1
}

name="d$DIAMETER"
train "$name-plain" &
train "$name-seedhead" --seed-head &
wait
# the seed thresholds: chosen on a quarter of train, confirmed on val
$PYTHON benchmarks/threshold_sweep.py --images "$T/images" --masks "$T/masks" --every 4 \
    --model "$RUNS/$name-seedhead.keras" >"$RUNS/$name-seedhead-sweep-train.txt"
$PYTHON benchmarks/threshold_sweep.py --images "$V/images" --masks "$V/masks" \
    --model "$RUNS/$name-seedhead.keras" >"$RUNS/$name-seedhead-sweep-val.txt"
for model in "$name-plain" "$name-seedhead"; do
    $PYTHON -m cellwatch evaluate --images "$V/images" --masks "$V/masks" \
        --model "$RUNS/$model.keras" --json "$RUNS/$model-eval-val.json" \
        --per-image "$RUNS/$model-eval-val.csv" >>"$RUNS/$model.log" 2>&1
done
echo "scores: $RUNS/*-eval-val.json; seed-threshold sweeps: $RUNS/*-sweep-*.txt"

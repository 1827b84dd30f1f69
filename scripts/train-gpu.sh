#!/usr/bin/env bash
# Train the default U-Net with each loss (dice, ce, ce+dice) side by side on one GPU, with
# identical data, seed and step budget, then score each with `cellwatch evaluate` on val.
# This is how the bundled model and the loss ablation in docs/model.md were made.
#
#   KERAS_BACKEND=jax scripts/train-gpu.sh            # steps fitted to TRAIN_S seconds
#   EPOCHS=40 STEPS=250 scripts/train-gpu.sh          # a fixed budget (skips calibration)
#   EVALUATE=0 ...                                      # train only
#
# Each model's card records its exact `cellwatch train` command, which reproduces it alone.
set -euo pipefail
DATA=${DATA:-../shared/data/dsb2018-fluo}
RUNS=${RUNS:-runs}
BATCH=${BATCH:-16}
WORKERS=${WORKERS:-4}       # crop-drawing processes per run
TRAIN_S=${TRAIN_S:-360}     # wall-clock seconds of training steps per run, when calibrating
LOSSES=${LOSSES:-"dice ce ce+dice"}
CAL_STEPS=${CAL_STEPS:-60}  # steps per calibration epoch
TRAIN_ARGS=${TRAIN_ARGS:-}  # more `cellwatch train` options, the same for every run
CELLWATCH=${CELLWATCH:-python3 -m cellwatch}
export KERAS_BACKEND=${KERAS_BACKEND:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$RUNS"
T="$DATA/train" V="$DATA/val"

train_all() {  # train_all DIR EPOCHS STEPS: one run per loss, all at once
    local dir=$1 epochs=$2 steps=$3 pids=()
    mkdir -p "$dir"
    for loss in $LOSSES; do
        $CELLWATCH train --images "$T/images" --masks "$T/masks" \
            --val-images "$V/images" --val-masks "$V/masks" \
            --out "$dir/unet-${loss/+/-}.keras" --loss "$loss" --batch-size "$BATCH" \
            --epochs "$epochs" --steps "$steps" --workers "$WORKERS" $TRAIN_ARGS \
            >"$dir/unet-${loss/+/-}.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

if [[ -z "${STEPS:-}" ]]; then
    # calibrate: the second of two short epochs, all runs at once, gives seconds per step
    start=$(date +%s)
    train_all "$RUNS/calibrate" 2 "$CAL_STEPS"
    ms=$(python3 - "$RUNS"/calibrate/*.log <<'PY'
import re, sys
# Keras prints "60/60 - 5s - 81ms/step" per epoch; take each run's last epoch, the slowest run
last = []
for log in sys.argv[1:]:
    steps = re.findall(r"([0-9.]+)(ms|s)/step", open(log).read())
    value, unit = steps[-1]
    last.append(float(value) * (1 if unit == "ms" else 1000))
print(max(last))
PY
)
    STEPS=${EPOCH_STEPS:-250}
    EPOCHS=$(python3 -c "print(max(2, int($TRAIN_S * 1000 / $ms / $STEPS)))")
    echo "calibration: ${ms} ms/step with $(wc -w <<<"$LOSSES") runs at once" \
        "($(($(date +%s) - start)) s); training $EPOCHS epochs of $STEPS steps"
fi
start=$(date +%s)
train_all "$RUNS" "${EPOCHS:-40}" "$STEPS"
echo "training took $(($(date +%s) - start)) s"
[[ ${EVALUATE:-1} == 1 ]] || exit 0
pids=()
for model in "$RUNS"/unet-*.keras; do
    [[ $model == *.last.keras ]] && continue
    $CELLWATCH evaluate --images "$V/images" --masks "$V/masks" --model "$model" \
        --json "${model%.keras}.eval.json" >"${model%.keras}.eval.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
grep -H "accuracy\|MAPE" "$RUNS"/*.eval.log || true

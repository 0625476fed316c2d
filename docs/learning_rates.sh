#!/usr/bin/env bash
# The learning-rate table of docs/quality.md: the kl policy's 8:16 at 55% of linear FLOPs with
# learnable corrections fitted end to end (output-kl) at three peak learning rates, each on 16 sotu
# calibration windows (the last 4 held out), evaluated beside no correction on the sotu and emails
# evaluation splits.
#   bash docs/learning_rates.sh smollm2-135m 4 16   # model, batch, evaluation windows
#   bash docs/learning_rates.sh gemma3-270m 2 8
set -euo pipefail
model=${1:-smollm2-135m} batch=${2:-4} windows=${3:-16}
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
common=(--model "$model" --calib-sample start --batch-size "$batch" --device cpu --dtype float32)
recipes=()
for lr in 1e-3 3e-4 1e-4; do
  out=results/learning-rates/$model/$lr
  if [ ! -f "$out/recipe.json" ]; then
    "$actsparse" calibrate "${common[@]}" --dataset sotu --calib-windows 16 --pattern 8:16 --criterion amber \
      --policy kl --kl-windows 2 --mitigation learnable --objective output-kl --learn input+output --lr "$lr" --out "$out"
  fi
  recipes+=(--recipe "$out")
done
for text in sotu emails; do
  "$actsparse" eval "${common[@]}" --dataset "$text" --calib-dataset sotu --windows "$windows" \
    --calib-windows "$windows" --variant 'pattern=8:16 criterion=amber policy=kl kl_windows=2' "${recipes[@]}" \
    --out "docs/results/learning-rates-$model-$text.json" --markdown "docs/results/learning-rates-$model-$text.md"
done

#!/usr/bin/env bash
# The learning-rate tables of docs/quality.md: the kl policy's 8:16 at 55% of linear FLOPs with
# learnable corrections fitted end to end (output-kl) at several peak learning rates on sotu
# calibration windows (the last quarter held out), evaluated beside no correction on the same
# layers (the policy measured on the same calibration windows) on the sotu and emails evaluation
# splits.
#   bash scripts/learning_rates.sh smollm2-135m 4 16   # model, batch, evaluation windows
#   bash scripts/learning_rates.sh gemma3-270m 2 8
# The environment picks the table: the first one (the defaults) fitted learn=input+output on the
# split's first 16 windows; the spread one is
#   SAMPLE=spread CALIB_WINDOWS=32 LEARN=input LRS="1e-3 1e-4" bash scripts/learning_rates.sh gemma3-270m 2 8
# An entry of LRS with commas (1e-3,1e-4) is one recipe that searches those rates.
set -euo pipefail
model=${1:-smollm2-135m} batch=${2:-4} windows=${3:-16}
sample=${SAMPLE:-start} calib_windows=${CALIB_WINDOWS:-16} learn=${LEARN:-input+output}
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
common=(--model "$model" --calib-sample "$sample" --calib-windows "$calib_windows" --batch-size "$batch"
        --device cpu --dtype float32)
table=learning-rates-$model  # the first table's name; the others say how they differ from it
if [ "$sample/$calib_windows/$learn" != start/16/input+output ]; then
  table=learning-rates-$sample-$calib_windows-$learn-$model
fi
recipes=()
for lr in ${LRS:-1e-3 3e-4 1e-4}; do
  out=results/learning-rates/$model/$sample-$calib_windows-$learn/$lr
  if [ ! -f "$out/recipe.json" ]; then
    "$actsparse" calibrate "${common[@]}" --dataset sotu --pattern 8:16 --criterion amber --policy kl \
      --kl-windows 2 --corrections learnable --objective output-kl --learn "$learn" --lr "$lr" --out "$out"
  fi
  recipes+=(--recipe "$out")
done
for text in sotu emails; do
  "$actsparse" eval "${common[@]}" --dataset "$text" --calib-dataset sotu --windows "$windows" \
    --variant 'pattern=8:16 criterion=amber policy=kl kl_windows=2' "${recipes[@]}" \
    --out "docs/results/$table-$text.json" --markdown "docs/results/$table-$text.md"
done

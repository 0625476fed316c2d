#!/usr/bin/env bash
# The tables of docs/quality.md: calibrate the learnable rows once into recipes (on the sotu
# calibration split, 1790–2000), then evaluate them beside the training-free rows on two texts the
# calibration never saw: the sotu evaluation split (2001–2021) and the emails evaluation split.
#   bash docs/quality.sh smollm2-135m 16 4      # model, evaluation windows, batch, calibration windows
#   bash docs/quality.sh gemma3-270m 8 2 16     # (calibration windows default to evaluation windows)
set -euo pipefail
model=${1:-smollm2-135m} windows=${2:-16} batch=${3:-4} calib_windows=${4:-$windows}
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
recipes=results/quality/$model
common=(--model "$model" --calib-windows "$calib_windows" --batch-size "$batch" --device cpu --dtype float32)
calibrated=(
  "8:16-block-mse|--pattern 8:16 --objective block-mse"
  "8:16-block-normed|--pattern 8:16 --objective block-normed"
  "8:16-output-kl|--pattern 8:16 --objective output-kl"
  "8:16-kl-output-kl|--pattern 8:16 --policy kl --kl-windows 2 --objective output-kl"
  "2:4-output-kl|--pattern 2:4 --objective output-kl"
  "2:4-kl-output-kl|--pattern 2:4 --policy kl --kl-windows 2 --objective output-kl"
)
made=()
for entry in "${calibrated[@]}"; do
  name=${entry%%|*} options=${entry#*|}
  if [ ! -f "$recipes/$name/recipe.json" ]; then  # a recipe made once serves both texts
    # shellcheck disable=SC2086
    "$actsparse" calibrate "${common[@]}" --dataset sotu --criterion amber --mitigation learnable $options \
      --out "$recipes/$name"
  fi
  made+=(--recipe "$recipes/$name")
done
for text in sotu emails; do
  "$actsparse" eval "${common[@]}" --dataset "$text" --calib-dataset sotu --windows "$windows" \
    --variants docs/variants/quality.txt "${made[@]}" --tasks lastword --limit 300 \
    --out "docs/results/quality-$model-$text.json" --markdown "docs/results/quality-$model-$text.md"
done

#!/usr/bin/env bash
# The tables of docs/quality.md: calibrate the learnable rows once into recipes (on the sotu
# calibration split, 1790–2000), then evaluate them beside the training-free rows on two texts the
# calibration never saw: the sotu evaluation split (2001–2021) and the emails evaluation split.
# TABLE names the table: its training-free rows are docs/variants/$TABLE.txt, its calibrated rows
# ("recipe name|calibrate options") docs/variants/$TABLE-recipes.txt.
#   bash scripts/quality.sh smollm2-135m 16 4                        # model, evaluation windows, batch,
#   bash scripts/quality.sh gemma3-270m 8 2 16                       # calibration windows (default: evaluation windows)
#   TABLE=channel-order bash scripts/quality.sh smollm2-135m 16 4
# LASTWORD (default 300) is how many lastword questions each row answers; 0 leaves the task out.
# CALIB_SAMPLE (default start: the tables of docs/quality.md before "Calibration windows" take the
# split's first windows) is --calib-sample: spread takes them evenly across the split.
set -euo pipefail
model=${1:-smollm2-135m} windows=${2:-16} batch=${3:-4} calib_windows=${4:-$windows}
table=${TABLE:-quality}
tasks=(--tasks lastword --limit "${LASTWORD:-300}")
if [ "${LASTWORD:-300}" = 0 ]; then tasks=(); fi
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
sample=${CALIB_SAMPLE:-start}
recipes=results/quality/$model/$sample  # named by their settings, so tables share them
common=(--model "$model" --calib-windows "$calib_windows" --calib-sample "$sample"
        --batch-size "$batch" --device cpu --dtype float32)
made=()
while IFS='|' read -r name options; do
  if [ ! -f "$recipes/$name/recipe.json" ]; then  # a recipe made once serves both texts
    # shellcheck disable=SC2086
    "$actsparse" calibrate "${common[@]}" --dataset sotu --criterion amber $options --out "$recipes/$name"
  fi
  made+=(--recipe "$recipes/$name")
done < "docs/variants/$table-recipes.txt"
for text in sotu emails; do
  "$actsparse" eval "${common[@]}" --dataset "$text" --calib-dataset sotu --windows "$windows" \
    --variants "docs/variants/$table.txt" "${made[@]}" "${tasks[@]}" \
    --out "docs/results/$table-$model-$text.json" --markdown "docs/results/$table-$model-$text.md"
done

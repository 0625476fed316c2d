#!/usr/bin/env bash
# Makes the tables of docs/mitigation.md: every correction at 2:4 and 8:16, magnitude and amber,
# on each embedded model (88 and 30 minutes on 2 cores). They were made with learnable fitted
# block by block to all four vectors, which the options below restore.
#   bash scripts/mitigation.sh            # both models
#   bash scripts/mitigation.sh gemma3-270m
set -euo pipefail
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(smollm2-135m gemma3-270m)
for name in "${models[@]}"; do
  windows=16 calib=32
  if [ "$name" = gemma3-270m ]; then windows=8 calib=16; fi
  "$actsparse" eval --model "$name" --pattern 2:4,8:16 --criterion magnitude,amber \
    --corrections none,shift,var,shift+var,smoothquant,learnable,shift+learnable \
    --objective block-mse --learn input+output \
    --windows "$windows" --calib-windows "$calib" --calib-sample start \
    --out "docs/results/mitigation-$name.json" --markdown "docs/results/mitigation-$name.md"
done

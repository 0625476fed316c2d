#!/usr/bin/env bash
# Makes the tables of docs/layer-policy-w8a8-weights.md: layer policies, Outstanding-sparse W8A8
# and weight N:M baselines, the rows of docs/variants/layer-policy-w8a8-weights.txt, on each
# embedded model (12 and 15 minutes on 2 cores).
#   bash scripts/layer_policy_w8a8_weights.sh
set -euo pipefail
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
variants=docs/variants/layer-policy-w8a8-weights.txt
"$actsparse" eval --model smollm2-135m --variants "$variants" --windows 16 --calib-windows 16 \
  --calib-sample start --out docs/results/layer-policy-w8a8-weights-smollm2-135m.json \
  --markdown docs/results/layer-policy-w8a8-weights-smollm2-135m.md
"$actsparse" eval --model gemma3-270m --variants "$variants" --windows 8 --calib-windows 8 \
  --calib-sample start --out docs/results/layer-policy-w8a8-weights-gemma3-270m.json \
  --markdown docs/results/layer-policy-w8a8-weights-gemma3-270m.md

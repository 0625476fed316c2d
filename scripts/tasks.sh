#!/usr/bin/env bash
# Makes the tables of docs/tasks.md: both embedded models dense and at 8:16 amber on every
# projection, on mmlu and lastword (offline) with greedy-generation agreement.
#   bash scripts/tasks.sh
set -euo pipefail
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
"$actsparse" eval --model smollm2-135m --pattern 8:16 --criterion amber --windows 4 \
  --tasks mmlu,lastword --limit 300 --generate 16 \
  --out docs/results/tasks-smollm2-135m.json --markdown docs/results/tasks-smollm2-135m.md
"$actsparse" eval --model gemma3-270m --pattern 8:16 --criterion amber --windows 4 \
  --tasks mmlu,lastword --limit 200 --generate 16 \
  --out docs/results/tasks-gemma3-270m.json --markdown docs/results/tasks-gemma3-270m.md

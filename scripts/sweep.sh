#!/usr/bin/env bash
# Makes docs/sweep/ (the pattern sweep in docs/evaluation.md): SmolLM2-135M at five patterns,
# magnitude and amber, every projection (18 minutes on 2 cores).
#   bash scripts/sweep.sh
set -euo pipefail
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
"$actsparse" sweep --model smollm2-135m --pattern 2:4,4:8,8:16,16:32,unstructured:0.5 \
  --criterion magnitude,amber --out docs/sweep

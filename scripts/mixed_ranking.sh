#!/usr/bin/env bash
# The ranking table of docs/quality.md, "Mixed patterns".
# Mixed patterns (8:16 on the layers making up a share of linear FLOPs, 12:16 on the rest): does it
# matter whether the kl policy ranks the layers by their cost at 8:16 alone (what it does) or by
# what 8:16 costs over 12:16 (the marginal cost; the sum of both patterns' costs is what the choice
# changes)? Measures each layer's output KL at both patterns (cached, one run each), then prints,
# for several shares, how many layers each ranking puts at 8:16 and the summed cost of its choice.
#   bash scripts/mixed_ranking.sh smollm2-135m 4   # model, batch
set -euo pipefail
model=${1:-smollm2-135m} batch=${2:-4}
actsparse=${ACTSPARSE:-.venv/bin/actsparse}
out=results/mixed-ranking/$model
mkdir -p "$out"
for pattern in 8:16 12:16; do
  "$actsparse" sensitivity --model "$model" --dataset sotu --pattern "$pattern" --criterion amber \
    --corrections permute --policy kl --kl-windows 2 --calib-windows 64 --calib-sample spread \
    --batch-size "$batch" --device cpu --dtype float32 --out "$out/${pattern/:/-}.json"
done
"$(dirname "$actsparse")/python" - "$model" "$out" <<'EOF'
import json
import sys

from actsparse.io.models import model_skeleton
from actsparse.pieces.policies import budget_layers
from actsparse.sparse.targets import linear_flops, linear_layers

model, out = sys.argv[1:]
main, rest = (json.load(open(f"{out}/{name}.json"))["sensitivity"] for name in ("8-16", "12-16"))
layers = linear_layers(model_skeleton(model))
flops = {name: linear_flops(layers[name]) for name in main}
total = sum(linear_flops(layer) for layer in layers.values())
print(f"{model}: summed output KL of every layer alone, 8:16 {sum(main.values()):.4f}, "
      f"12:16 {sum(rest.values()):.4f}")
print("| 8:16 share | ranked by 8:16's cost: layers, summed KL | by the marginal cost: layers, summed KL | layers differing |")
print("|---:|---:|---:|---:|")
for share in (0.05, 0.1, 0.2, 0.3, 0.55):
    cells, chosen = [], []
    for costs in (main, {name: main[name] - rest[name] for name in main}):
        at_8_16 = set(budget_layers(costs, flops, total, share))
        summed = sum(main[n] for n in at_8_16) + sum(rest[n] for n in main if n not in at_8_16)
        cells.append(f"{len(at_8_16)}, {summed:.4f}")
        chosen.append(at_8_16)
    print(f"| {share:.0%} | {cells[0]} | {cells[1]} | {len(chosen[0] ^ chosen[1])} |")
EOF

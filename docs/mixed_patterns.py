"""Mixed N:M patterns, tried by hand for docs/quality.md: a denser pattern on the layers whose
sparsity costs the model most, a sparser one elsewhere, against one pattern on a chosen set.

The layers are ranked by the kl policy's measurement (each layer alone at 8:16, KL of the model's
output from dense), read from a recipe made by docs/quality.sh; two handles on disjoint layers run
together. Rows at equal removed share of linear FLOPs compare with the kl policy's row (8:16 on
55%, the rest dense), rows with every layer sparse with 8:16 and 16:32 everywhere. All on the sotu
evaluation split; nothing here is calibrated but the ranking, which comes from the calibration split.

    .venv/bin/python docs/mixed_patterns.py smollm2-135m 16
"""

from __future__ import annotations

import re
import sys

import torch

from actsparse import SparsityConfig, load_model, load_recipe, sparsify
from actsparse.data import evaluation_text, token_windows
from actsparse.distribution import Totals, dense_reference, next_token_logits
from actsparse.patterns import parse_pattern
from actsparse.policy import budget_layers
from actsparse.targets import linear_flops, linear_layers


def sparse_on(model: torch.nn.Module, pattern: str, names: list[str]):
    include = tuple(f"^{re.escape(name)}$" for name in names)
    return sparsify(model, SparsityConfig(pattern=pattern, criterion="amber", include=include))


def main(model_name: str, windows: int) -> None:
    model, tokenizer = load_model(model_name, "float32", 512, device="cpu")
    ranking = load_recipe(f"results/quality/{model_name}/8:16-kl-output-kl").sensitivity
    flops = {name: linear_flops(layer) for name, layer in linear_layers(model).items() if name in ranking}
    total = sum(linear_flops(layer) for layer in linear_layers(model).values())
    tokens = token_windows(tokenizer, evaluation_text("sotu").text(), 512, windows)

    def removed(pattern: str) -> float:
        parsed = parse_pattern(pattern)
        return 1 - parsed.n / parsed.m

    rows: list[tuple[str, dict[str, str]]] = []
    share = 0.55  # the kl policy's share at 8:16: 27.5% of linear FLOPs removed
    rows.append(
        (
            "8:16 on 55% (kl policy), rest dense",
            {n: "8:16" for n in budget_layers(ranking, flops, total, share)},
        )
    )
    for denser in ("12:16", "14:16"):
        # 8:16 on a share s, `denser` on the rest: removed 0.5 s + r (1 − s) = 0.5 × 0.55
        s = (removed("8:16") * share - removed(denser)) / (removed("8:16") - removed(denser))
        sparse = budget_layers(ranking, flops, total, s)
        layers = {n: ("8:16" if n in sparse else denser) for n in ranking}
        rows.append((f"8:16 on {s:.0%} (least KL), {denser} on the rest", layers))
    rows.append(("8:16 everywhere", {n: "8:16" for n in ranking}))
    half = budget_layers(ranking, flops, total, 0.5)
    rows.append(
        (
            "8:16 on the least-KL half, 16:32 on the rest",
            {n: ("8:16" if n in half else "16:32") for n in ranking},
        )
    )
    rows.append(("16:32 everywhere", {n: "16:32" for n in ranking}))

    prepared = []  # each handle made alone (sparsify wants a dense model), attached together below
    for _, layers in rows:
        handles = []
        for pattern in sorted(set(layers.values())):
            handles.append(sparse_on(model, pattern, [n for n, p in layers.items() if p == pattern]))
            handles[-1].remove()
        prepared.append(handles)
    totals = [Totals() for _ in rows]
    dense_totals = Totals()
    with torch.inference_mode():
        for window in tokens.split(4):
            dense = next_token_logits(model, window)
            targets, reference = window[:, 1:].flatten(), dense_reference(dense)
            dense_totals.add(dense, targets, None)
            for handles, row in zip(prepared, totals):
                for handle in handles:
                    handle.attach()
                row.add(next_token_logits(model, window), targets, reference)
                for handle in handles:
                    handle.remove()
    print(
        f"{model_name}, sotu evaluation split, {len(tokens)} windows × 512 tokens, amber criterion, no corrections"
    )
    print("| layers | removed share of linear FLOPs | ppl | KL |")
    print("|---|---:|---:|---:|")
    ppl = torch.tensor(dense_totals.nll / dense_totals.tokens).exp().item()
    print(f"| dense | 0.0% | {ppl:.2f} | 0.0000 |")
    for (label, layers), row in zip(rows, totals):
        cut = sum(flops[n] * removed(p) for n, p in layers.items()) / total
        ppl = torch.tensor(row.nll / row.tokens).exp().item()
        print(f"| {label} | {cut:.1%} | {ppl:.2f} | {row.kl / row.tokens:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

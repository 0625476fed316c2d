"""docs/scale.md's three-size table and its two plots, read from the JSON results in docs/results.

    .venv/bin/python scripts/scale_tables.py

Writes ``docs/results/scale-three-sizes.md`` (KL, perplexity, top-1 and lastword of each row at each
size, on both texts), ``docs/scale/kl_by_size.png`` (KL against the parameters of the decoder
projections, a line per row) and ``docs/scale/speed_at_quality.png`` (the 1.5B model's decode
speed-up against its KL, from ``scale-qwen2.5-coder-1.5b-decode.json``). Every figure comes from a
result file named in ``SOURCES``; nothing is measured here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from actsparse.core.paths import atomic_file, write_text_atomic  # noqa: E402

RESULTS = Path("docs/results")
PLOTS = Path("docs/scale")
MODELS = {
    "smollm2-135m": "SmolLM2-135M",
    "gemma3-270m": "Gemma 3 270M",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B",
}
TEXTS = ("sotu", "emails")
QWEN = "qwen2.5-coder-1.5b"

SOURCES: dict[str, dict[str, tuple[str, str]]] = {
    # row → model → (result file stem, before "-<text>.json"; row label in it)
    "dense": {
        model: (stem, "dense")
        for model, stem in {
            "smollm2-135m": "quality-smollm2-135m",
            "gemma3-270m": "quality-gemma3-270m",
            QWEN: f"scale-{QWEN}",
        }.items()
    },
    "8:16 on every projection (amber score)": {
        "smollm2-135m": ("quality-smollm2-135m", "8:16 amber"),
        "gemma3-270m": ("quality-gemma3-270m", "8:16 amber"),
        QWEN: (f"scale-{QWEN}", "8:16 amber"),
    },
    "2:4 on every projection (amber score)": {
        "smollm2-135m": ("quality-smollm2-135m", "2:4 amber"),
        "gemma3-270m": ("quality-gemma3-270m", "2:4 amber"),
        QWEN: (f"scale-{QWEN}", "2:4 amber"),
    },
    "8:16, amber rule at 55% (1.5B: + learnable)": {
        "smollm2-135m": ("quality-smollm2-135m", "8:16 amber policy=amber"),
        "gemma3-270m": ("quality-gemma3-270m", "8:16 amber policy=amber"),
        QWEN: (f"scale-{QWEN}", "8:16 amber policy=amber learnable"),
    },
    "best 8:16 at 55%: kl policy, permute, learned input shift and scale": {
        "smollm2-135m": (
            "learned-parts-smollm2-135m",
            "8:16 amber policy=kl permute+learnable kl_windows=2 learn=input",
        ),
        "gemma3-270m": (
            "learned-parts-gemma3-270m",
            "8:16 amber policy=kl permute+learnable kl_windows=2 learn=input",
        ),
        QWEN: (f"scale-{QWEN}", "8:16 amber policy=kl permute+learnable kl_windows=1"),
    },
    "mixed: 8:16 on 10%, 12:16 on the rest, permute, learnable": {
        "smollm2-135m": (
            "mixed-patterns-smollm2-135m",
            "8:16 amber policy=kl rest=12:16 permute+learnable flop_share=0.1 kl_windows=2",
        ),
        "gemma3-270m": (
            "mixed-patterns-gemma3-270m",
            "8:16 amber policy=kl rest=12:16 permute+learnable flop_share=0.1 kl_windows=2",
        ),
        QWEN: (
            f"scale-{QWEN}",
            "8:16 amber policy=kl rest=12:16 permute+learnable flop_share=0.1 kl_windows=1",
        ),
    },
    "2:4, amber rule at 55% (1.5B: + learnable)": {
        "smollm2-135m": ("quality-smollm2-135m", "2:4 amber policy=amber"),
        "gemma3-270m": ("quality-gemma3-270m", "2:4 amber policy=amber"),
        QWEN: (f"scale-{QWEN}", "2:4 amber policy=amber learnable"),
    },
}


@functools.cache
def read_results(stem: str, text: str) -> dict[str, Any] | None:
    """The result file ``<stem>-<text>.json``, read once; None where it was not measured."""
    path = RESULTS / f"{stem}-{text}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def find_row(model: str, row: str, text: str) -> dict[str, Any] | None:
    """The result row of ``row`` for ``model`` on ``text``, or None where it was not measured."""
    stem, label = SOURCES[row][model]
    results = read_results(stem, text)
    found = [r for r in results["rows"] if r["label"] == label] if results else []
    return found[0] if found else None


def projection_parameters(model: str) -> float:
    """Parameters in the decoder projections: half their FLOPs per token (a multiply-add each)."""
    stem, _ = SOURCES["dense"][model]
    return read_results(stem, "sotu")["rows"][0]["flops"]["linear_flops_per_token"] / 2


def lastword(row: dict[str, Any]) -> str:
    task = (row.get("tasks") or {}).get("lastword")
    return f"{100 * task['acc']:.1f}% (n={task['n']})" if task else "—"


def three_size_table() -> str:
    lines = []
    for text in TEXTS:
        lines += [
            f"**{text} evaluation split**",
            "",
            "| row | model | ppl | KL | top-1 | lastword | sparse FLOPs | removed |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in SOURCES:
            for model, name in MODELS.items():
                found = find_row(model, row, text)
                if found is None:
                    lines.append(f"| {row} | {name} | not measured | | | | | |")
                    continue
                flops = found["flops"]
                lines.append(
                    f"| {row} | {name} | {found['perplexity']:.2f} | {found['kl_to_dense']:.4f} "
                    f"| {100 * found['top1_agreement']:.1f}% | {lastword(found)} "
                    f"| {100 * flops['sparse_share']:.1f}% | {100 * flops['removed_share']:.1f}% |"
                )
        lines.append("")
    return "\n".join(lines)


def plot_kl_by_size(path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    sizes = {model: projection_parameters(model) for model in MODELS}
    for axis, text in zip(axes, TEXTS):
        for row in list(SOURCES)[1:]:
            points = [(sizes[m], r["kl_to_dense"]) for m in MODELS if (r := find_row(m, row, text))]
            axis.plot(*zip(*points), marker="o", label=row)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks(list(sizes.values()), [MODELS[m] for m in sizes], fontsize=7, rotation=30)
        axis.minorticks_off()
        axis.set_xlabel("parameters in the decoder projections (log)")
        axis.set_title(f"KL to dense, {text} evaluation split (log)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(figure, path)


def plot_speed_at_quality(path: Path) -> None:
    source = RESULTS / f"scale-{QWEN}-decode.json"
    if not source.exists():
        print(f"{source} is not measured yet (STEP=decode bash scripts/scale.sh); no speed plot.")
        return
    decode = json.loads(source.read_text(encoding="utf-8"))
    kl = {row["label"]: row["kl_to_dense"] for row in read_results(f"scale-{QWEN}", "sotu")["rows"]}
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for row in decode["rows"]:
        label = DECODE_ROWS.get(row["configuration"])
        if label is None or label not in kl:
            continue
        axis.scatter(kl[label], row["speedup"])
        axis.annotate(
            row["configuration"], (kl[label], row["speedup"]), (6, 0), textcoords="offset points", fontsize=7
        )
    axis.axhline(1, color="grey", linestyle="--", linewidth=1)
    axis.axvline(0.10, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("KL to dense, sotu evaluation split")
    axis.set_ylabel("decode tokens/s ÷ dense (bfloat16)")
    axis.set_title(f"{MODELS[QWEN]}: decode speed-up against quality (phase=all, cpu-kernel)", fontsize=9)
    axis.grid(alpha=0.3)
    save(figure, path)


DECODE_ROWS = {  # decode benchmark configuration → label of the same configuration's quality row
    "dense": "dense",
    "8:16 every projection": "8:16 amber",
    "2:4 every projection": "2:4 amber",
    f"{QWEN}-8-16-amber-55": SOURCES["8:16, amber rule at 55% (1.5B: + learnable)"][QWEN][1],
    f"{QWEN}-2-4-amber-55": SOURCES["2:4, amber rule at 55% (1.5B: + learnable)"][QWEN][1],
    f"{QWEN}-8-16-kl-55": SOURCES["best 8:16 at 55%: kl policy, permute, learned input shift and scale"][
        QWEN
    ][1],
    f"{QWEN}-8-16-mixed-12-16": SOURCES["mixed: 8:16 on 10%, 12:16 on the rest, permute, learnable"][QWEN][1],
}


def save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    with atomic_file(path, "wb") as file:
        figure.savefig(file, format="png", dpi=130)
    plt.close(figure)


def main() -> None:
    write_text_atomic(RESULTS / "scale-three-sizes.md", three_size_table())
    plot_kl_by_size(PLOTS / "kl_by_size.png")
    plot_speed_at_quality(PLOTS / "speed_at_quality.png")


if __name__ == "__main__":
    main()

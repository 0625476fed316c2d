"""docs/scale.md's three-size table and its two plots, read from the JSON results in docs/results.

    .venv/bin/python scripts/scale_tables.py

Writes ``docs/results/scale-three-sizes.md`` (KL, perplexity, top-1 and lastword of each row at each
size, on both texts), ``docs/scale/kl_by_size.png`` (KL against the parameters of the decoder
projections, a line per row), and, once ``scale-qwen2.5-coder-1.5b-decode.json`` is measured,
``docs/results/scale-qwen2.5-coder-1.5b-speed-at-quality.md`` (the 1.5B model's decode speed-up
beside the same configurations' KL, perplexity and generation agreement under both phases) and
``docs/scale/speed_at_quality.png`` (speed-up against KL). Every figure comes from a result file
named in ``SOURCES`` or ``DECODE_ROWS``; nothing is measured here.
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


def size_ticks(sizes: dict[str, float]) -> tuple[list[float], list[str]]:
    """Tick places and labels for the models' sizes: names stacked where sizes are within 20%."""
    ticks: list[tuple[float, list[str]]] = []
    for model, size in sorted(sizes.items(), key=lambda item: item[1]):
        label = f"{MODELS[model]} ({size / 1e6:,.0f}M)"
        if ticks and size < 1.2 * ticks[-1][0]:
            ticks[-1][1].append(label)
        else:
            ticks.append((size, [label]))
    return [size for size, _ in ticks], ["\n".join(labels) for _, labels in ticks]


def plot_kl_by_size(path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    sizes = {model: projection_parameters(model) for model in MODELS}
    for axis, text in zip(axes, TEXTS):
        for row in list(SOURCES)[1:]:
            points = [(sizes[m], r["kl_to_dense"]) for m in MODELS if (r := find_row(m, row, text))]
            axis.plot(*zip(*points), marker="o", label=row)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks(*size_ticks(sizes), fontsize=7)
        axis.minorticks_off()
        axis.set_xlabel("parameters in the decoder projections (log)")
        axis.set_title(f"KL to dense, {text} evaluation split (log)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(figure, path)


DECODE_ROWS = {  # decode benchmark configuration → the row of SOURCES with the same configuration
    "dense": "dense",
    "dense, oneDNN": "dense",
    "8:16 every projection": "8:16 on every projection (amber score)",
    "2:4 every projection": "2:4 on every projection (amber score)",
    f"{QWEN}-8-16-amber-55": "8:16, amber rule at 55% (1.5B: + learnable)",
    f"{QWEN}-2-4-amber-55": "2:4, amber rule at 55% (1.5B: + learnable)",
    f"{QWEN}-8-16-kl-55": "best 8:16 at 55%: kl policy, permute, learned input shift and scale",
    f"{QWEN}-8-16-mixed-12-16": "mixed: 8:16 on 10%, 12:16 on the rest, permute, learnable",
}
"""The amber-policy decode rows are left out: their layers were chosen on random tokens (speed only)."""


@functools.cache
def decode_results() -> dict[str, Any] | None:
    """The decode benchmark's result file, read once; None where it was not measured."""
    source = RESULTS / f"scale-{QWEN}-decode.json"
    return json.loads(source.read_text(encoding="utf-8")) if source.exists() else None


def rouge_l(row: dict[str, Any] | None) -> str:
    generation = (row or {}).get("generation")
    return f"{generation['mean_rouge_l']:.3f}" if generation else "—"


def speed_at_quality() -> list[dict[str, Any]]:
    """The 1.5B model's decode rows beside the quality of the same configurations: speed-up, KL on
    both texts, perplexity, removed FLOPs and generation agreement under each phase."""
    decode = decode_results()
    generated = read_results(f"scale-{QWEN}-generation", "all")  # the phase=all generation file
    joined = []
    for timed in decode["rows"] if decode else []:
        row = DECODE_ROWS.get(timed["configuration"])
        if row is None:
            continue
        sotu, emails = (find_row(QWEN, row, text) for text in TEXTS)
        label = SOURCES[row][QWEN][1]
        all_phase = [r for r in generated["rows"] if r["label"] == f"{label} phase=all"] if generated else []
        joined.append(
            {"configuration": timed["configuration"], "row": row, "timed": timed, "sotu": sotu}
            | {"emails": emails, "generation_all": all_phase[0] if all_phase else None}
        )
    return joined


def speed_at_quality_table(rows: list[dict[str, Any]]) -> str:
    decode = decode_results()
    lines = [
        f"Decode: {decode['provenance']['machine']}, {decode['provenance']['date']}, "
        f"`{decode['provenance']['command']}` ({decode['new_tokens']} new tokens, phase=all, cpu-kernel); "
        "quality: the sotu and emails evaluation results beside it.",
        "",
        "| configuration | decode tokens/s | × best dense | peak RSS GiB | removed | sotu KL | emails KL "
        "| sotu ppl | gen. ROUGE-L phase=prefill | gen. ROUGE-L phase=all |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        timed, sotu, emails = row["timed"], row["sotu"], row["emails"]
        dense = row["row"] == "dense"
        lines.append(
            f"| {row['configuration']} | {timed['tokens_per_s']:.2f} | {timed['speedup']:.2f} "
            f"| {timed['peak_rss_gib']:.2f} | {100 * sotu['flops']['removed_share']:.1f}% "
            f"| {sotu['kl_to_dense']:.4f} | {emails['kl_to_dense']:.4f} | {sotu['perplexity']:.2f} "
            f"| {'1' if dense else rouge_l(sotu)} | {'1' if dense else rouge_l(row['generation_all'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_speed_at_quality(rows: list[dict[str, Any]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    below = {"dense, oneDNN", "8-16-kl-55", "2-4-amber-55"}  # labels set under their points, apart
    for row in rows:
        point = (row["sotu"]["kl_to_dense"], row["timed"]["speedup"])
        axis.scatter(*point)
        label = row["configuration"].removeprefix(f"{QWEN}-")  # recipe folders without the model
        axis.annotate(label, point, (6, -9 if label in below else 3), textcoords="offset points", fontsize=7)
    axis.axhline(1, color="grey", linestyle="--", linewidth=1)
    axis.axvline(0.10, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("KL to dense, sotu evaluation split")
    axis.set_ylabel("decode tokens/s ÷ best dense (bfloat16)")
    axis.set_title(f"{MODELS[QWEN]}: decode speed-up against quality (phase=all, cpu-kernel)", fontsize=9)
    axis.grid(alpha=0.3)
    save(figure, path)


def save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    with atomic_file(path, "wb") as file:
        figure.savefig(file, format="png", dpi=130)
    plt.close(figure)


def main() -> None:
    write_text_atomic(RESULTS / "scale-three-sizes.md", three_size_table())
    plot_kl_by_size(PLOTS / "kl_by_size.png")
    if not (rows := speed_at_quality()):
        print(f"scale-{QWEN}-decode.json is not measured (STEP=decode bash scripts/scale.sh): no speed table")
        return
    write_text_atomic(RESULTS / f"scale-{QWEN}-speed-at-quality.md", speed_at_quality_table(rows))
    plot_speed_at_quality(rows, PLOTS / "speed_at_quality.png")


if __name__ == "__main__":
    main()

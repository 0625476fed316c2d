"""Speed of the cpu-kernel backend's sparse linear layer against the best dense products on the same inputs.

    .venv/bin/python benchmarks/kernel.py [--tokens 512] [--repeats 7] [--threads 1,2] [--out FILE]

For each layer shape (in → out) of the embedded models and of Llama-3-8B, each pattern and each
thread count, in one run: PyTorch's dense ``F.linear`` (MKL), the same product through oneDNN
(``torch.utils.mkldnn``), the fused select-and-compress pass alone, the whole sparse layer (select,
compress and sparse GEMM, with the amber criterion's per-channel factor) on the best instruction
set and held to AVX2; then in bfloat16 the dense ``F.linear`` (oneDNN, on AMX where the CPU has
it) and the sparse layer on bfloat16 weights and inputs. Times are medians; ratios are the best
dense time of the same dtype over the sparse time (above 1: the sparse layer is faster). The CPU
and its vector and matrix extensions head the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import mkldnn

from actsparse import kernels, parse_pattern
from actsparse.core.cpu import median_ms, this_cpu
from actsparse.core.paths import write_json_atomic

SHAPES = {
    "SmolLM2-135M q/o": (576, 576),
    "SmolLM2-135M gate/up": (576, 1536),
    "SmolLM2-135M down": (1536, 576),
    "Gemma 3 270M gate/up": (640, 2048),
    "Gemma 3 270M down": (2048, 640),
    "Llama-3-8B q/o": (4096, 4096),
    "Llama-3-8B gate/up": (4096, 14336),
    "Llama-3-8B down": (14336, 4096),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--patterns", default="2:4,8:16,16:32")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="Comma-separated names of SHAPES.")
    parser.add_argument("--out", help="Also write the rows as JSON here.")
    args = parser.parse_args()
    if not kernels.AVAILABLE:
        raise SystemExit(
            "The compiled extension is not built; reinstall actsparse where a C compiler is present."
        )

    print(
        f"{this_cpu().describe()}, torch {torch.__version__}, sparse GEMM {kernels.gemm_isa()}, "
        f"selection {kernels.select_isa()}, {args.tokens} tokens"
    )
    print(
        "| layer | in → out | threads | pattern | F.linear ms | oneDNN ms | select ms | sparse ms "
        "| × best fp32 | AVX2 sparse ms | AVX2 × best fp32 | bf16 dense ms | bf16 sparse ms | bf16 × dense |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    generator = torch.Generator().manual_seed(0)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.shapes.split(","):
            width, out = SHAPES[name]
            x = torch.randn(args.tokens, width, generator=generator)
            weight = torch.randn(out, width, generator=generator) / width**0.5
            factor = torch.rand(width, generator=generator) + 0.5
            linear = torch.nn.Linear(width, out, bias=False)
            linear.weight.data = weight
            onednn = mkldnn.to_mkldnn(linear)
            packed = kernels.pack_linear(weight)
            x16, weight16 = x.bfloat16(), weight.bfloat16()
            scores16 = x16.abs() * factor.bfloat16()  # the bfloat16 scores the emulated path ranks
            packed16 = kernels.pack_linear(weight16)
            with torch.inference_mode():
                dense_ms = median_ms(lambda: F.linear(x, weight), args.repeats)
                onednn_ms = median_ms(lambda: onednn(x), args.repeats)
                dense16_ms = median_ms(lambda: F.linear(x16, weight16), args.repeats)
                best = min(dense_ms, onednn_ms)
                for text in args.patterns.split(","):
                    p = parse_pattern(text)
                    select_ms = median_ms(
                        lambda: kernels.nm_compress(x, factor, p.n, p.m, scratch=True), args.repeats
                    )
                    sparse_ms = median_ms(
                        lambda: kernels.sparse_linear(x, packed, p.n, p.m, factor), args.repeats
                    )
                    avx2_ms = median_ms(
                        lambda: kernels.sparse_linear(x, packed, p.n, p.m, factor, isa="avx2"), args.repeats
                    )
                    sparse16_ms = median_ms(
                        lambda: kernels.sparse_linear(x16, packed16, p.n, p.m, scores=scores16), args.repeats
                    )
                    row = {
                        "layer": name,
                        "in": width,
                        "out": out,
                        "threads": threads,
                        "pattern": str(p),
                        "dense_ms": dense_ms,
                        "onednn_ms": onednn_ms,
                        "select_ms": select_ms,
                        "sparse_ms": sparse_ms,
                        "avx2_sparse_ms": avx2_ms,
                        "bf16_dense_ms": dense16_ms,
                        "bf16_sparse_ms": sparse16_ms,
                    }
                    rows.append(row)
                    print(
                        f"| {name} | {width} → {out} | {threads} | {p} | {dense_ms:.2f} | {onednn_ms:.2f} "
                        f"| {select_ms:.2f} | {sparse_ms:.2f} | {best / sparse_ms:.2f} | {avx2_ms:.2f} "
                        f"| {best / avx2_ms:.2f} | {dense16_ms:.2f} | {sparse16_ms:.2f} "
                        f"| {dense16_ms / sparse16_ms:.2f} |",
                        flush=True,
                    )
    if args.out:
        write_json_atomic(
            Path(args.out), {"cpu": this_cpu().describe(), "torch": torch.__version__, "rows": rows}
        )


if __name__ == "__main__":
    main()

"""Speed of the cpu-kernel backend's sparse linear layer against dense products on the same inputs.

    .venv/bin/python benchmarks/kernel.py [--tokens 512] [--repeats 7] [--threads 1,2] [--out FILE]

For each layer shape (in → out) of the embedded models and of Llama-3-8B, each pattern and each
thread count, in one run: PyTorch's dense ``F.linear`` (MKL here), the same product through oneDNN
(``torch.utils.mkldnn``, PyTorch's other CPU backend: the fastest dense float32 product this
PyTorch has), the fused select-and-compress pass alone, the whole sparse layer (select, compress
and sparse GEMM, with the amber criterion's per-channel factor) on the best instruction set, and
the same held to AVX2 (what an AVX2-only CPU runs; MKL's own code path on AMD CPUs). Times are
medians; the ratios are dense time over sparse time, so above 1 means faster than dense.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import mkldnn

from actsparse import kernels, parse_pattern
from actsparse.paths import write_json_atomic

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


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cpu_name() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


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
        f"{cpu_name()}, torch {torch.__version__}, sparse GEMM {kernels.gemm_isa()}, selection {kernels.select_isa()}, {args.tokens} tokens"
    )
    print(
        "| layer | in → out | threads | pattern | F.linear ms | oneDNN ms | select ms | sparse ms "
        "| × F.linear | × oneDNN | AVX2 sparse ms | AVX2 × F.linear |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
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
            with torch.inference_mode():
                dense_ms = median_ms(lambda: F.linear(x, weight), args.repeats)
                onednn_ms = median_ms(lambda: onednn(x), args.repeats)
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
                    }
                    rows.append(row)
                    print(
                        f"| {name} | {width} → {out} | {threads} | {p} | {dense_ms:.2f} | {onednn_ms:.2f} "
                        f"| {select_ms:.2f} | {sparse_ms:.2f} | {dense_ms / sparse_ms:.2f} "
                        f"| {onednn_ms / sparse_ms:.2f} | {avx2_ms:.2f} | {dense_ms / avx2_ms:.2f} |",
                        flush=True,
                    )
    if args.out:
        write_json_atomic(Path(args.out), {"cpu": cpu_name(), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()

"""Cost of emulated N:M activation sparsity: a 512-token prefill, dense and with sparsity attached.

    .venv/bin/python benchmarks/overhead.py [--model smollm2-135m] [--pattern 8:16] [--criterion amber]
                                           [--dtype float32|bfloat16|float16]

Dense, sparse with the compiled selection pass, and sparse with the PyTorch-only selection are timed
in the same run, interleaved, and their medians compared (the emulated backend: zeros multiplied
densely). In float32 the compiled pass scores and selects; in bfloat16 and float16 PyTorch computes
the scores and the compiled pass ranks them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from actsparse import SparsityConfig, kernels, load_model, sparsify
from actsparse.core.cpu import this_cpu


def seconds(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pattern", default="8:16")
    parser.add_argument("--criterion", default="amber")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    model, _ = load_model(args.model, args.dtype)
    ids = torch.randint(
        0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    handle = sparsify(model, SparsityConfig(pattern=args.pattern, criterion=args.criterion))
    handle.remove()
    compiled = kernels.AVAILABLE

    def prefill() -> None:
        with torch.inference_mode():
            model(ids, use_cache=False)

    def sparse_prefill(use_compiled: bool) -> Callable[[], None]:
        def run() -> None:
            kernels.AVAILABLE = use_compiled  # the switch the layers consult on every call
            with handle:
                prefill()
            kernels.AVAILABLE = compiled

        return run

    runs = {"dense": prefill, "sparse, PyTorch selection": sparse_prefill(False)}
    if compiled:
        runs["sparse, compiled selection"] = sparse_prefill(True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(seconds(run))
    dense = statistics.median(times["dense"])
    print(f"{this_cpu().describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{args.model} in {args.dtype}, {args.tokens}-token prefill, {args.pattern} {args.criterion} "
        "on every decoder projection"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:28s} {median * 1e3:8.1f} ms   {median / dense:5.2f}x dense   (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()

"""Cost of emulated N:M activation sparsity: a 512-token prefill, dense and with sparsity attached.

    .venv/bin/python benchmarks/overhead.py [--model smollm2-135m] [--pattern 8:16] [--criterion amber]

Both are timed in the same run, alternately, and the medians compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from actsparse import SparsityConfig, load_model, sparsify


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pattern", default="8:16")
    parser.add_argument("--criterion", default="amber")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    model, _ = load_model(args.model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    handle = sparsify(model, SparsityConfig(pattern=args.pattern, criterion=args.criterion))
    handle.remove()

    def prefill() -> None:
        with torch.inference_mode():
            model(ids, use_cache=False)

    def sparse_prefill() -> None:
        with handle:
            prefill()

    prefill(), sparse_prefill()  # warm-up
    dense, sparse = [], []
    for _ in range(args.repeats):
        dense.append(median_seconds(prefill, 1))
        sparse.append(median_seconds(sparse_prefill, 1))
    d, s = statistics.median(dense), statistics.median(sparse)
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.model}, {args.tokens}-token prefill, {args.pattern} {args.criterion} on every decoder projection")
    print(f"dense  {d * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"sparse {s * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"ratio  {s / d:8.2f}x")


if __name__ == "__main__":
    main()

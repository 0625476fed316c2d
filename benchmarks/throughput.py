"""Throughput of evaluation forward passes: tokens per second of the dense model and of 8:16 sparsity,
for the embedded models, in float32 and bfloat16, at batch 1 and 8, on this machine's CPU and on
CUDA when PyTorch sees a GPU.

    .venv/bin/python benchmarks/throughput.py [--models smollm2-135m,gemma3-270m] [--seqlen 256]
        [--batches 1,8] [--dtypes float32,bfloat16] [--devices cpu,cuda] [--repeats 5] [--out FILE]

Per model, dtype and device, every row (dense; emulated 8:16 amber on every decoder projection;
cpu-kernel where it runs) is timed in the same run, interleaved, one full forward pass of
``batch × seqlen`` tokens each (what `actsparse eval --batch-size` runs; attaching and removing
the sparse layers is not timed); the medians are compared with the dense row of the same batch.
The results also go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from actsparse import SparsityConfig, load_model, sparsify
from actsparse.core.cpu import this_cpu
from actsparse.core.paths import write_json_atomic


def seconds(model: torch.nn.Module, handle: Any, ids: torch.Tensor, device: torch.device) -> float:
    """Wall time of one forward pass over ``ids``, with ``handle``'s sparse layers attached when
    given (attaching and removing them is not timed)."""
    with torch.inference_mode(), handle if handle is not None else contextlib.nullcontext():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"{this_cpu().describe()}, {torch.get_num_threads()} threads"


def measure(
    name: str, dtype: str, device: torch.device, seqlen: int, batches: list[int], repeats: int
) -> list[dict]:
    model, _ = load_model(name, dtype, device=str(device))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (max(batches), seqlen), generator=generator).to(device)
    variants = {"dense": None, "8:16 emulated": SparsityConfig(pattern="8:16", criterion="amber")}
    if device.type == "cpu":
        variants["8:16 cpu-kernel"] = SparsityConfig(pattern="8:16", criterion="amber", backend="cpu-kernel")
    handles = {}
    for label, config in variants.items():
        if config is not None:
            handles[label] = sparsify(model, config)
            handles[label].remove()
    rows = []
    for batch in batches:
        window = ids[:batch]

        times: dict[str, list[float]] = {label: [] for label in variants}
        for label in variants:
            seconds(model, handles.get(label), window, device)  # warm-up
        for _ in range(repeats):
            for label in variants:
                times[label].append(seconds(model, handles.get(label), window, device))
        dense = statistics.median(times["dense"])
        for label, values in times.items():
            median = statistics.median(values)
            rows.append(
                {
                    "model": name,
                    "dtype": dtype,
                    "device": machine(device),
                    "batch": batch,
                    "seqlen": seqlen,
                    "row": label,
                    "ms": median * 1e3,
                    "tokens_per_s": batch * seqlen / median,
                    "time_vs_dense": median / dense,
                }
            )
            print(
                f"{name:13s} {dtype:8s} {device.type:4s} batch {batch:2d}  {label:16s} "
                f"{median * 1e3:9.1f} ms  {batch * seqlen / median:9.0f} tokens/s  {median / dense:5.2f}x dense"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/throughput.json"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for device in (torch.device(d) for d in args.devices.split(",")):
        print(machine(device), f"torch {torch.__version__}")
        for name in args.models.split(","):
            for dtype in args.dtypes.split(","):
                rows += measure(name, dtype, device, args.seqlen, batches, args.repeats)
    write_json_atomic(
        args.out,
        {"rows": rows, "command": "benchmarks/throughput.py", "args": vars(args) | {"out": str(args.out)}},
    )
    print(f"Saved to {args.out}")


if __name__ == "__main__":
    main()

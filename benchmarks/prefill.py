"""Wall-clock prefill with the cpu-kernel backend against the best dense model, in one run.

    .venv/bin/python benchmarks/prefill.py [--model smollm2-135m] [--pattern 8:16] [--criterion amber]

Times a prefill of --tokens tokens (one sequence, no KV cache kept) of the dense model, of the model
with every decoder projection sparsified through the compiled sparse GEMM (cpu-kernel), of the same
emulated (zeros multiplied densely), of the same with the ``permute`` correction (each call's
input gathered into the calibrated channel order first), of a mixed pattern (--pattern on the 10%
of linear FLOPs the budget policy finds least sensitive, --rest-pattern on the other projections:
``rest_pattern``), of the dense model with its linear layers on oneDNN
(``torch.utils.mkldnn``), and of the cpu-kernel model with its dense LM head on oneDNN too (so that
only the projections differ from the oneDNN row); then the dense model and the cpu-kernel model in
bfloat16 (dense bfloat16 runs on oneDNN, with AMX where the CPU has it). All interleaved round by
round. Prints medians and ratios to the best dense float32 model (F.linear or oneDNN, whichever was
faster in this run): above 1 is faster. The CPU and its vector and matrix extensions head the output.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import replace

import torch
from torch.utils import mkldnn

from actsparse import SparsityConfig, kernels, load_model, sparsify
from actsparse.core.cpu import this_cpu
from actsparse.pieces.policies import Budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pattern", default="8:16")
    parser.add_argument("--criterion", default="amber")
    parser.add_argument("--rest-pattern", default="12:16")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not kernels.AVAILABLE:
        raise SystemExit(
            "The compiled extension is not built; reinstall actsparse where a C compiler is present."
        )

    model, _ = load_model(args.model)
    ids = torch.randint(
        0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    config = SparsityConfig(pattern=args.pattern, criterion=args.criterion)
    kernel_config = replace(config, backend="cpu-kernel")
    # Each configuration on its own copy, attached throughout: attaching and removing stay untimed.
    kernel_model, emulated_model = copy.deepcopy(model), copy.deepcopy(model)
    sparsify(kernel_model, kernel_config)
    sparsify(emulated_model, config)
    permuted_model = copy.deepcopy(model)  # the order's values do not change the time: calibrated on ids
    sparsify(permuted_model, replace(kernel_config, corrections="permute"), ids)
    mixed_config = replace(kernel_config, policy=Budget(flop_share=0.1), rest_pattern=args.rest_pattern)
    mixed_model = copy.deepcopy(model)  # which layers take which pattern barely changes the time
    sparsify(mixed_model, mixed_config, ids)
    onednn_model = mkldnn.to_mkldnn(copy.deepcopy(model))
    onednn_head = copy.deepcopy(model)
    onednn_head.lm_head = mkldnn.to_mkldnn(onednn_head.lm_head)
    sparsify(onednn_head, kernel_config)  # stays attached
    bfloat16_model = copy.deepcopy(model).to(torch.bfloat16)
    bfloat16_kernel = copy.deepcopy(bfloat16_model)
    sparsify(bfloat16_kernel, kernel_config)

    def prefill(net: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return net(ids, use_cache=False).logits

    runs = {
        "dense (F.linear)": lambda: prefill(model),
        f"{config.label}, cpu-kernel": lambda: prefill(kernel_model),
        f"{config.label}, emulated": lambda: prefill(emulated_model),
        f"{config.label} permute, cpu-kernel": lambda: prefill(permuted_model),
        f"{args.pattern} on 10%, {args.rest_pattern} rest, cpu-kernel": lambda: prefill(mixed_model),
        "dense, oneDNN linear layers": lambda: prefill(onednn_model),
        f"{config.label}, cpu-kernel, oneDNN LM head": lambda: prefill(onednn_head),
        "dense, bfloat16": lambda: prefill(bfloat16_model),
        f"{config.label}, cpu-kernel, bfloat16": lambda: prefill(bfloat16_kernel),
    }
    reference = prefill(model)
    for run in runs.values():  # warm-up
        run()
    # The oneDNN copies compute the same models.
    torch.testing.assert_close(prefill(onednn_model), reference, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(prefill(onednn_head), prefill(kernel_model), rtol=1e-3, atol=1e-3)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    dense = min(
        statistics.median(times[name]) for name in ("dense (F.linear)", "dense, oneDNN linear layers")
    )
    print(
        f"{this_cpu().describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"sparse GEMM {kernels.gemm_isa()}, selection {kernels.select_isa()}"
    )
    print(f"{args.model}, {args.tokens}-token prefill, every decoder projection sparse")
    print(f"{'':44s} {'ms':>8s}   × best dense float32 (median of {args.repeats})")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:44s} {median * 1e3:8.1f}   {dense / median:5.2f}")


if __name__ == "__main__":
    main()

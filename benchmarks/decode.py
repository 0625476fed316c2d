"""Decode speed of the cpu-kernel backend: one-token products that read only the kept inputs' weights.

    .venv/bin/python benchmarks/decode.py layers [--shape 4096x4096] [--stack-gib 1] [--threads 1,2]
    .venv/bin/python benchmarks/decode.py generate [--models smollm2-135m,llama-3.2-1b-shape]
        [--recipes DIR,...]

``layers``: one decode step (a single token) through a stack of distinct layers whose weights
together are many times the last-level cache, so that every product streams its weights from
memory, in float32 and bfloat16, at each pattern and thread count, interleaved round by round:
PyTorch's ``F.linear`` (MKL), the same product through oneDNN (``torch.utils.mkldnn``), actsparse's
GEMV keeping every input (the same code reading every row: its own dense bandwidth), and the sparse
layer (selection with the amber criterion's factor, then the GEMV over the kept rows). Beside each
time, the GB/s of weights read (a sparse call reads the kept rows only), and the bandwidth a plain
copy reaches with the same threads (bytes read plus bytes written). Ratios are best dense time
(F.linear or oneDNN) over sparse time.

``generate``: greedy decoding through ``model.generate`` (``--new-tokens`` after a
``--prompt-tokens`` prompt; decode time is generate(1 + K) − generate(1), so the prompt does not
count): the dense model (PyTorch's ``F.linear``), a copy of it with every linear layer on oneDNN,
``phase="all"`` with every decoder projection at each pattern and with the amber layer policy, both
on the cpu-kernel backend, and each ``--recipes`` folder (calibrated for the one model given) run
the same way (``recipe.computed(phase="all", backend="cpu-kernel")``), interleaved round by round
(each configuration kept as a recipe and attached afresh in each round, so that one
configuration's packed weights are in memory at a time). Speed-ups are over the faster dense row.
Then the peak resident memory while a process attaches each configuration (none for dense) and
decodes, each in its own process, measured from after the model is built (``VmHWM`` reset through
``/proc/self/clear_refs``; Linux only), as a multiple of the dense model's. ``llama-3.2-1b-shape``
is a ``LlamaConfig`` of Llama-3.2-1B's shape with random weights (speed does not depend on their
values).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import mkldnn

from actsparse import SparsityConfig, kernels, load_model, parse_pattern, sparsify
from actsparse.core.cpu import this_cpu
from actsparse.core.paths import write_json_atomic
from actsparse.io.recipe import Recipe, load_recipe
from actsparse.sparse.handle import SparsityHandle

LLAMA_32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
"""Llama-3.2-1B's shape (its config on the Hub), for a model with random weights."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each run, the runs taking turns round by round (after one warm-up each)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def copy_bandwidth(gib: float, rounds: int) -> float:
    """GB/s of a plain copy of ``gib`` GiB with the current threads (bytes read + bytes written)."""
    source = torch.ones(int(gib * 2**30) // 4)
    target = torch.empty_like(source)
    seconds = interleaved({"copy": lambda: target.copy_(source)}, rounds)["copy"]
    return 2 * source.numel() * 4 / seconds / 1e9


def layers(args: argparse.Namespace) -> None:
    width, out = (int(v) for v in args.shape.split("x"))
    print(
        f"{this_cpu().describe()}, torch {torch.__version__}, GEMV {kernels.gemm_isa()}, "
        f"selection {kernels.select_isa()}"
    )
    print(f"one token through a stack of {width} → {out} layers, {args.stack_gib} GiB of weights per dtype")
    print(
        "| dtype | threads | pattern | F.linear ms | oneDNN ms | GEMV all rows ms | sparse ms "
        "| × best dense | dense GB/s | sparse GB/s | copy GB/s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype_name in args.dtypes.split(","):
        stack_rows(args, dtype_name, width, out)


def stack_rows(args: argparse.Namespace, dtype_name: str, width: int, out: int) -> None:
    """The table's rows of one dtype: its stack of layers is freed when they are printed."""
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[dtype_name]
    layer_bytes = width * out * dtype.itemsize
    count = max(2, math.ceil(args.stack_gib * 2**30 / layer_bytes))
    weights = [(torch.randn(out, width, generator=generator) / width**0.5).to(dtype) for _ in range(count)]
    onednn = []
    for weight in weights:
        linear = torch.nn.Linear(width, out, bias=False, dtype=dtype)
        linear.weight.data = weight
        onednn.append(mkldnn.to_mkldnn(linear, dtype))
    packed = [kernels.pack_linear(weight) for weight in weights]
    factor = (torch.rand(width, generator=generator) + 0.5).to(dtype)
    x = torch.randn(1, width, generator=generator).to(dtype)

    def through(product: Callable[[int], object]) -> Callable[[], None]:
        def run() -> None:
            for index in range(count):
                product(index)

        return run

    def sparse(n: int, m: int) -> Callable[[int], object]:
        if dtype == torch.float32:
            return lambda i: kernels.sparse_linear(x, packed[i], n, m, factor)
        # scores in bfloat16 as the cpu-kernel backend computes them, selection included
        return lambda i: kernels.sparse_linear(x, packed[i], n, m, scores=x.abs() * factor)

    patterns = [parse_pattern(p) for p in args.patterns.split(",")]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        copy = copy_bandwidth(args.stack_gib / 2, args.rounds)
        runs = {
            "F.linear": through(lambda i: F.linear(x, weights[i])),
            "oneDNN": through(lambda i: onednn[i](x)),
            "all rows": through(sparse(16, 16)),
        }
        runs |= {str(p): through(sparse(p.n, p.m)) for p in patterns}
        with torch.inference_mode():
            seconds = {name: value / count for name, value in interleaved(runs, args.rounds).items()}
        best = min(seconds["F.linear"], seconds["oneDNN"])
        for p in patterns:
            sparse_s = seconds[str(p)]
            print(
                f"| {dtype_name} | {threads} | {p} | {seconds['F.linear'] * 1e3:.3f} "
                f"| {seconds['oneDNN'] * 1e3:.3f} | {seconds['all rows'] * 1e3:.3f} | {sparse_s * 1e3:.3f} "
                f"| {best / sparse_s:.2f} | {layer_bytes / best / 1e9:.1f} "
                f"| {layer_bytes * p.n / p.m / sparse_s / 1e9:.1f} | {copy:.1f} |",
                flush=True,
            )


def build_model(name: str, dtype_name: str) -> torch.nn.Module:
    if name == "llama-3.2-1b-shape":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[dtype_name])
        try:
            return LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B)).eval()
        finally:
            torch.set_default_dtype(default)
    model, _ = load_model(name, dtype=dtype_name)
    return model.eval()


DENSE, ONEDNN = "dense", "dense, oneDNN"
"""The dense rows: the model as loaded (PyTorch's ``F.linear``) and a copy of it on oneDNN."""


def on_onednn(model: torch.nn.Module, dtype_name: str) -> torch.nn.Module:
    """A copy of the dense model with every linear layer on oneDNN (``torch.utils.mkldnn``)."""
    return mkldnn.to_mkldnn(copy.deepcopy(model), DTYPES[dtype_name])


def configurations(patterns: str, recipes: str = "") -> dict[str, SparsityConfig | Recipe]:
    """The timed configurations by label: each pattern (comma-separated) on every projection and
    under the amber policy, and each recipe folder (labelled by its name), all on every call through
    the cpu-kernel backend."""
    common = dict(criterion="amber", phase="all", backend="cpu-kernel")
    found: dict[str, SparsityConfig | Recipe] = {}
    for pattern in patterns.split(","):
        found[f"{pattern} every projection"] = SparsityConfig(pattern=pattern, **common)
        found[f"{pattern} amber policy"] = SparsityConfig(pattern=pattern, policy="amber", **common)
    for folder in filter(None, recipes.split(",")):
        found[Path(folder).name] = load_recipe(folder).computed(phase="all", backend="cpu-kernel")
    return found


def attach(model: torch.nn.Module, configuration: SparsityConfig | Recipe) -> SparsityHandle:
    if isinstance(configuration, Recipe):
        return sparsify(model, recipe=configuration)
    return sparsify(model, configuration, calibration_windows(model))


def calibration_windows(model: torch.nn.Module) -> torch.Tensor:
    """Token windows for the amber policy's sensitivities (random tokens: only speed is measured)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (2, 128), generator=generator)


def prompt(model: torch.nn.Module, tokens: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)


def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


def peak_rss(args: argparse.Namespace) -> None:
    """In its own process: build the model, then attach the configuration and decode; print the
    peak resident memory of that second part (the kernel's high-water mark, reset after building,
    so that converting or initialising the model does not count)."""
    model = build_model(args.model, args.dtype)
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as clear_refs:
        clear_refs.write("5")  # resets VmHWM, the peak resident set size
    if args.config == ONEDNN:
        model = on_onednn(model, args.dtype)
    elif args.config != DENSE:
        attach(model, configurations(args.pattern, args.recipes)[args.config])
    greedy(model, prompt(model, args.prompt_tokens), 4)
    with open("/proc/self/status", encoding="utf-8") as status:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith("Vm")}
    print(json.dumps({"peak_rss_gib": kib["VmHWM"] / 2**20, "rss_gib": kib["VmRSS"] / 2**20}))


def measured_rss(args: argparse.Namespace, model: str, dtype: str, config: str) -> dict[str, float]:
    """``peak_rss``'s figures, from a process of its own."""
    command = [sys.executable, __file__, "rss", "--model", model, "--dtype", dtype, "--config", config]
    command += ["--pattern", args.pattern, "--prompt-tokens", str(args.prompt_tokens)]
    command += ["--recipes", args.recipes]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def generate(args: argparse.Namespace) -> None:
    machine = f"{this_cpu().describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(machine)
    print(
        f"greedy decode through model.generate: {args.new_tokens} new tokens after a "
        f"{args.prompt_tokens}-token prompt, phase='all', amber criterion, cpu-kernel backend"
    )
    print(
        "| model | dtype | configuration | decode tokens/s | × best dense | peak RSS GiB | × dense "
        "| RSS after GiB | × dense |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = [
        row
        for model_name in args.models.split(",")
        for dtype_name in args.dtypes.split(",")
        for row in decode_rows(args, model_name, dtype_name)
    ]
    if args.out:
        command = " ".join(["benchmarks/decode.py", *sys.argv[1:]])
        provenance = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "command": command}
        write_json_atomic(args.out, {"provenance": provenance, "new_tokens": args.new_tokens, "rows": rows})


def decode_rows(args: argparse.Namespace, model_name: str, dtype_name: str) -> list[dict[str, object]]:
    """The table's rows of one model in one dtype, printed and returned (the model is freed after)."""
    model = build_model(model_name, dtype_name)
    onednn = on_onednn(model, dtype_name)
    ids = prompt(model, args.prompt_tokens)
    # Each configuration as a recipe (calibrated once), attached afresh in every round and freed
    # after it, so that one configuration's packed weights are held at a time.
    recipes: dict[str, Recipe] = {}
    for label, configuration in configurations(args.pattern, args.recipes).items():
        handle = attach(model, configuration)
        recipes[label] = handle.recipe()
        handle.remove()
        del handle

    # generate(1) and generate(1 + K) of each configuration, timed without the attach and
    # remove around them: each round attaches once and times both.
    times: dict[str, list[float]] = {DENSE: [], ONEDNN: []} | {label: [] for label in recipes}
    for round_ in range(args.rounds + 1):
        for label in times:
            net = onednn if label == ONEDNN else model
            handle = attach(model, recipes[label]) if label in recipes else None
            try:
                start = time.perf_counter()
                greedy(net, ids, 1)
                middle = time.perf_counter()
                greedy(net, ids, 1 + args.new_tokens)
                end = time.perf_counter()
            finally:
                if handle is not None:
                    handle.remove()
                del handle
                gc.collect()
            if round_:  # the first round warms up
                times[label].append((end - middle) - (middle - start))
    dense_rss = measured_rss(args, model_name, dtype_name, DENSE)
    dense_rate = args.new_tokens / min(statistics.median(times[DENSE]), statistics.median(times[ONEDNN]))
    rows = []
    for label, values in times.items():
        rate = args.new_tokens / statistics.median(values)
        rss = dense_rss if label == DENSE else measured_rss(args, model_name, dtype_name, label)
        print(
            f"| {model_name} | {dtype_name} | {label} | {rate:.2f} | {rate / dense_rate:.2f} "
            f"| {rss['peak_rss_gib']:.2f} | {rss['peak_rss_gib'] / dense_rss['peak_rss_gib']:.2f} "
            f"| {rss['rss_gib']:.2f} | {rss['rss_gib'] / dense_rss['rss_gib']:.2f} |",
            flush=True,
        )
        rows.append(
            {"model": model_name, "dtype": dtype_name, "configuration": label, "tokens_per_s": rate}
            | {"speedup": rate / dense_rate, "peak_rss_gib": rss["peak_rss_gib"], "rss_gib": rss["rss_gib"]}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stack = commands.add_parser("layers", help="one token through a stack of layers from memory")
    stack.add_argument("--shape", default="4096x4096", help="in x out of every layer")
    stack.add_argument("--stack-gib", type=float, default=1.0)
    stack.add_argument("--patterns", default="2:4,8:16,16:32")
    stack.add_argument("--dtypes", default="float32,bfloat16")
    stack.add_argument("--threads", default="1,2")
    stack.add_argument("--rounds", type=int, default=7)
    decoding = commands.add_parser("generate", help="greedy decode tokens/s and peak RSS")
    decoding.add_argument("--models", default="smollm2-135m,llama-3.2-1b-shape")
    decoding.add_argument("--dtypes", default="float32,bfloat16")
    decoding.add_argument("--pattern", default="8:16", help="one pattern or several, comma-separated")
    decoding.add_argument("--prompt-tokens", type=int, default=16)
    decoding.add_argument("--new-tokens", type=int, default=32)
    decoding.add_argument("--rounds", type=int, default=5)
    decoding.add_argument("--recipes", default="", help="comma-separated recipe folders of the one model")
    decoding.add_argument("--out", help="also write the rows as JSON here")
    rss = commands.add_parser("rss", help=argparse.SUPPRESS)
    rss.add_argument("--model", required=True)
    rss.add_argument("--dtype", required=True)
    rss.add_argument("--config", required=True)
    rss.add_argument("--pattern", required=True)
    rss.add_argument("--prompt-tokens", type=int, required=True)
    rss.add_argument("--recipes", default="")
    args = parser.parse_args()
    if not kernels.AVAILABLE:
        raise SystemExit(
            "The compiled extension is not built; reinstall actsparse where a C compiler is present."
        )
    {"layers": layers, "generate": generate, "rss": peak_rss}[args.command](args)


if __name__ == "__main__":
    main()

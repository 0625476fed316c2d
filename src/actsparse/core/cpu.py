"""This CPU: its name and instruction sets, and whether the cpu-kernel backend is faster on it than
the best dense product, measured in a few seconds on a layer of the model's shape.

Whether N:M activation sparsity pays on a CPU depends on the CPU: the sparse GEMM runs on vector
units, one weight load per multiply-add, while a dense product reuses every loaded weight across
tokens. Where the dense product runs near the FMA limit (MKL on Intel Xeons) the sparse layer is at
best a little faster; on CPUs with AMX, dense bfloat16 runs on matrix tiles several times faster than
any vector kernel, and per-token masks do not fit a tile shared by many tokens.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from actsparse import kernels

EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")
"""The vector and matrix extensions that decide the speed of dense and sparse products."""
PAYS_ABOVE = 1.05
"""The sparse layer pays when the best dense product takes this many times as long (below, a run's
noise could turn the verdict)."""
CHECK_TOKENS = 256
"""Tokens of the prefill call the verdict times."""
MAX_COPIES = 2048
"""Most copies of a layer a decode timing passes through (tiny layers would need many more to fill
the caches, each call costing Python time)."""
TRUSTED_SPREAD = 2.0
"""The most the slowest repeat of a timed product may take over its fastest for a verdict to be
drawn from the timings: beyond it the machine is busy with other work, and its noise dwarfs the
``PAYS_ABOVE`` margin."""
VERDICT_TRIES = 3
"""How many times a verdict's timings are taken before timings that vary beyond
``TRUSTED_SPREAD`` end in no verdict."""


@dataclass(frozen=True)
class Cpu:
    """A CPU's model name and ``/proc/cpuinfo`` flags."""

    name: str
    flags: frozenset[str]

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def computes_bfloat16(self) -> bool:
        """True when dense bfloat16 products have hardware of their own here (AMX or AVX512-BF16)."""
        return self.has_amx or "avx512_bf16" in self.flags

    def describe(self) -> str:
        extensions = [flag for flag in EXTENSIONS if flag in self.flags]
        return f"{self.name} ({', '.join(extensions) or 'no AVX2'})"


def this_cpu(cpuinfo_path: Path | str = "/proc/cpuinfo") -> Cpu:
    """The CPU this process runs on (from ``/proc/cpuinfo`` where there is one)."""
    name, flags = platform.processor() or "unknown CPU", frozenset[str]()
    try:
        with open(cpuinfo_path, encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return Cpu(name, flags)


@dataclass(frozen=True)
class CallTiming:
    """Median ms of one call shape: the sparse layer and each dense product in the model's dtype."""

    tokens: int
    sparse_ms: float
    dense_ms: dict[str, float]
    spread: float = 1.0
    """The largest ratio of a product's slowest repeat to its fastest (1: every repeat alike)."""

    @property
    def best_dense(self) -> tuple[str, float]:
        return min(self.dense_ms.items(), key=lambda item: item[1])

    @property
    def speedup(self) -> float:
        """The best dense product's time over the sparse layer's: above 1, the sparse layer is faster."""
        return self.best_dense[1] / self.sparse_ms

    @property
    def pays(self) -> bool:
        return self.speedup >= PAYS_ABOVE

    def describe(self) -> str:
        name, best = self.best_dense
        phase = "decode" if self.tokens <= kernels.GEMV_MAX_TOKENS else "prefill"
        return (
            f"{phase} ({self.tokens} token{'s' if self.tokens > 1 else ''}) {self.sparse_ms:.3g} ms "
            f"against {best:.3g} ms for the best dense product ({name}), {self.speedup:.2f}×"
        )


@dataclass(frozen=True)
class Verdict:
    """Whether the cpu-kernel layer beats the dense products on this CPU, for one layer shape."""

    cpu: Cpu
    dtype: torch.dtype
    in_features: int
    out_features: int
    pattern: str
    prefill: CallTiming
    decode: CallTiming
    bfloat16_ms: float | None = None
    """The dense prefill product in bfloat16, for a float32 model on a CPU that computes bfloat16
    itself (else None)."""
    repeats: int = 5
    tries: int = 1
    """How many times the timings were taken (more when the first ones varied too much)."""

    @property
    def spread(self) -> float:
        """The largest ratio of a timed product's slowest repeat to its fastest."""
        return max(self.prefill.spread, self.decode.spread)

    @property
    def trusted(self) -> bool:
        """True when the timings varied little enough (``TRUSTED_SPREAD``) to advise from."""
        return self.spread <= TRUSTED_SPREAD

    def sentence(self) -> str:
        """The verdict in plain words, with the figures behind it and what to use instead; no
        advice when the timings varied beyond ``TRUSTED_SPREAD``."""
        dtype = str(self.dtype).removeprefix("torch.")
        timed = f"{self.repeats} repeats a product, taken {self.tries} time{'s' if self.tries > 1 else ''}"
        if not self.trusted:
            return (
                f"no verdict: the timings on this CPU varied too much to advise from (the slowest repeat "
                f"of a product took {self.spread:.2f}× its fastest, over {timed}; a verdict needs at most "
                f"{TRUSTED_SPREAD:g}×), so another program is probably using the CPU; run `actsparse info` "
                f"again when it is idle. Layer {self.in_features} → {self.out_features} at {self.pattern} "
                f"in {dtype}, as measured: {self.prefill.describe()}; {self.decode.describe()} "
                f"({self.cpu.describe()})"
            )
        if self.prefill.pays and self.decode.pays:
            text = "cpu-kernel pays on this CPU, in prefill and in decode"
        elif self.decode.pays:
            text = (
                "cpu-kernel pays on this CPU in decode only (phase=all); prefill is faster with the "
                "dense model"
            )
        elif self.prefill.pays:
            text = "cpu-kernel pays on this CPU in prefill only; decode is faster dense (phase=prefill)"
        else:
            text = (
                "cpu-kernel does not pay on this CPU: for speed, run the dense model (cpu-kernel still "
                "computes what emulated computes, for measuring quality)"
            )
        text += (
            f". Layer {self.in_features} → {self.out_features} at {self.pattern} in {dtype}: "
            f"{self.prefill.describe()}; {self.decode.describe()} (per layer, weights read from "
            "memory; in a whole model each layer's call also costs Python time, which on small "
            "models takes much of the decode gain: benchmarks/decode.py generate measures it; "
            f"the slowest repeat of a product took {self.spread:.2f}× its fastest, over {timed})."
        )
        best_prefill = min(self.prefill.sparse_ms, self.prefill.best_dense[1])
        if self.bfloat16_ms is not None and self.bfloat16_ms * PAYS_ABOVE < best_prefill:
            engine = "AMX" if self.cpu.has_amx else "AVX512-BF16"
            text += (
                f" Dense bfloat16 prefill ({engine}) took {self.bfloat16_ms:.3g} ms, "
                f"{self.prefill.sparse_ms / self.bfloat16_ms:.1f}× faster than the sparse layer: for "
                "speed, load the model with --dtype bfloat16."
            )
        if self.cpu.has_amx and not self.prefill.pays:
            text += (
                " On matrix engines like AMX a dense product of many tokens shares each tile of "
                "weights, which per-token N:M masks cannot; N:M activation sparsity pays in prefill "
                "there only with hardware that skips the dropped inputs (sparse tensor cores, the "
                "papers' target)."
            )
        return f"{text} ({self.cpu.describe()})"


def timings_ms(run: Callable[[], object], repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``run``, after one warm-up call."""
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(run: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``run``, after one warm-up call."""
    return statistics.median(timings_ms(run, repeats))


def decode_stack_bytes(cache_dir: Path | str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Bytes of weights a decode timing streams through: twice the largest cache (as ``cache_dir``
    lists them), so that they come from memory as a model's weights do, within 64 MiB and 1 GiB."""
    largest = 0
    for size_file in Path(cache_dir).glob("index*/size"):
        text = size_file.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        largest = max(largest, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return min(max(2 * largest, 64 * 2**20), 2**30)


def time_products(
    in_features: int, out_features: int, n: int, m: int, dtype: torch.dtype, tokens: int, repeats: int
) -> tuple[CallTiming, float | None]:
    """Median ms of the sparse layer (select, compress and sparse product) and of each dense product
    in ``dtype`` (F.linear; for a float32 prefill also oneDNN) on random inputs of the given shape;
    and of dense bfloat16 when ``dtype`` is float32, the call is a prefill and the CPU computes
    bfloat16 itself (else None). A decode call (at most ``kernels.GEMV_MAX_TOKENS`` tokens) passes
    through copies of the layer that fill ``decode_stack_bytes`` (at most ``MAX_COPIES``), so that
    its weights stream from memory; its times are per layer."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(dtype)
    factor = torch.rand(in_features, generator=generator) + 0.5
    decode = tokens <= kernels.GEMV_MAX_TOKENS
    copies = min(-(-decode_stack_bytes() // (weight.numel() * weight.element_size())), MAX_COPIES)
    copies = copies if decode else 1
    packed = kernels.pack_linear(weight)
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    stored = [packed] + [replace(packed, storage=packed.storage.clone()) for _ in range(copies - 1)]

    spreads = []

    def per_layer_ms(run: Callable[[], object]) -> float:
        times = timings_ms(run, repeats)
        spreads.append(max(times) / max(min(times), 1e-9))
        return statistics.median(times) / copies

    bfloat16 = None
    with torch.inference_mode():
        if dtype == torch.float32:
            sparse = per_layer_ms(lambda: [kernels.sparse_linear(x, p, n, m, factor) for p in stored])
        else:
            scores = x.abs() * factor.to(dtype)
            sparse = per_layer_ms(lambda: [kernels.sparse_linear(x, p, n, m, scores=scores) for p in stored])
        dense = {"F.linear": per_layer_ms(lambda: [F.linear(x, w) for w in weights])}
        if dtype == torch.float32 and not decode and torch.backends.mkldnn.is_available():
            from torch.utils import mkldnn

            linear = torch.nn.Linear(in_features, out_features, bias=False)
            linear.weight.data = weight
            onednn = mkldnn.to_mkldnn(linear)
            dense["oneDNN"] = per_layer_ms(lambda: onednn(x))
        if dtype == torch.float32 and not decode and this_cpu().computes_bfloat16:
            x16, weight16 = x.bfloat16(), weight.bfloat16()
            bfloat16 = per_layer_ms(lambda: F.linear(x16, weight16))
    return CallTiming(tokens, sparse, dense, max(spreads)), bfloat16


def measure_verdict(
    in_features: int, out_features: int, n: int, m: int, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> Verdict:
    """Time the cpu-kernel layer against the dense products on this CPU for one layer shape, in a
    prefill of ``CHECK_TOKENS`` tokens and a one-token decode step (see ``time_products``; the
    decode timing holds up to 2 GiB of layer copies for a moment). Timings that vary beyond
    ``TRUSTED_SPREAD`` are taken again, up to ``VERDICT_TRIES`` times; the verdict of the last
    try then gives no advice (``Verdict.trusted``)."""
    for tries in range(1, VERDICT_TRIES + 1):
        prefill, bfloat16 = time_products(in_features, out_features, n, m, dtype, CHECK_TOKENS, repeats)
        decode, _ = time_products(in_features, out_features, n, m, dtype, 1, repeats)
        shape = (in_features, out_features, f"{n}:{m}")
        verdict = Verdict(this_cpu(), dtype, *shape, prefill, decode, bfloat16, repeats, tries)
        if verdict.trusted:
            break
    return verdict

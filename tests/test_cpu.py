"""The cpu-kernel verdict: whether multiplying only the kept inputs beats the best dense product here."""

import pytest
import torch

from actsparse import kernels
from actsparse.core import cpu

XEON = cpu.Cpu("Test Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
EPYC = cpu.Cpu("Test EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}))


def forced(prefill_sparse, decode_sparse, dense=10.0, bfloat16=None, machine=EPYC, dtype=torch.float32):
    """A verdict from given times (ms), as if measured: the dense products take ``dense`` in prefill
    and a tenth of it in decode."""
    return cpu.Verdict(
        machine,
        dtype,
        4096,
        4096,
        "8:16",
        cpu.CallTiming(256, prefill_sparse, {"F.linear": dense * 1.3, "oneDNN": dense}),
        cpu.CallTiming(1, decode_sparse, {"F.linear": dense / 10}),
        bfloat16,
    )


def test_the_verdict_says_the_kernel_pays_when_it_beats_the_best_dense_product():
    verdict = forced(prefill_sparse=8.0, decode_sparse=0.5)
    assert verdict.prefill.best_dense == ("oneDNN", 10.0) and verdict.prefill.speedup == pytest.approx(1.25)
    text = verdict.sentence()
    assert text.startswith("cpu-kernel pays on this CPU, in prefill and in decode")
    assert "1.25×" in text and "Test EPYC (avx2, avx512f, avx512_bf16)" in text
    assert "bfloat16" not in text.split("(")[0]


def test_the_verdict_says_when_dense_wins_and_what_to_use_instead():
    text = forced(prefill_sparse=12.0, decode_sparse=2.0, bfloat16=2.0, machine=XEON).sentence()
    assert text.startswith("cpu-kernel does not pay on this CPU: for speed, run the dense model")
    assert "Dense bfloat16 prefill (AMX) took 2 ms, 6.0× faster" in text and "--dtype bfloat16" in text
    assert "sparse tensor cores" in text
    # beaten by less than the noise margin: still "does not pay"
    assert not forced(prefill_sparse=9.8, decode_sparse=2.0).prefill.pays


def test_the_verdict_names_the_phase_that_pays():
    text = forced(prefill_sparse=12.0, decode_sparse=0.6).sentence()
    assert text.startswith("cpu-kernel pays on this CPU in decode only (phase=all)")
    assert "decode (1 token) 0.6 ms against 1 ms" in text and "benchmarks/decode.py generate" in text


def test_this_cpu_reads_the_model_name_and_the_extensions_that_matter(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Test Xeon\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_int8\n\n"
        "processor\t: 1\nmodel name\t: Test Xeon\nflags\t\t: fpu\n"
    )
    xeon = cpu.this_cpu(info)
    assert xeon.describe() == "Test Xeon (avx2, avx512f, amx_bf16, amx_int8)"
    assert xeon.has_amx and xeon.computes_bfloat16
    info.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    old = cpu.this_cpu(info)
    assert old.describe() == "Old CPU (no AVX2)" and not old.has_amx and not old.computes_bfloat16
    info.write_text("model name\t: EPYC\nflags\t\t: avx2 avx512f avx512_bf16\n")
    assert cpu.this_cpu(info).computes_bfloat16 and not cpu.this_cpu(info).has_amx


@pytest.mark.skipif(not kernels.AVAILABLE, reason="the compiled extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_verdict_is_measured_for_both_phases_and_dtypes(monkeypatch, dtype):
    monkeypatch.setattr(cpu, "decode_stack_bytes", lambda: 2**20)  # 32 copies of the layer
    verdict = cpu.measure_verdict(64, 128, 8, 16, dtype, repeats=1)
    assert verdict.prefill.tokens == cpu.CHECK_TOKENS and verdict.decode.tokens == 1
    assert verdict.prefill.sparse_ms > 0 and all(ms > 0 for ms in verdict.prefill.dense_ms.values())
    assert ("oneDNN" in verdict.prefill.dense_ms) == (
        dtype == torch.float32 and torch.backends.mkldnn.is_available()
    )


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [(["48K", "2048K", "96M"], 192 * 2**20), (["32K", "1024K", "16M"], 64 * 2**20), (["2G"], 2**30)],
)
def test_decode_timings_stream_twice_the_largest_cache_within_bounds(tmp_path, sizes, expected):
    for index, size in enumerate(sizes):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert cpu.decode_stack_bytes(tmp_path) == expected

"""The cpu-kernel backend: the compiled select-and-compress pass and sparse GEMM agree with the
emulated path for every pattern, criterion, correction and instruction set."""

import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from actsparse import ActsparseError, SparsityConfig, kernels, parse_pattern, sparsify
from actsparse.config import CalibrationSettings
from actsparse.core.ops import apply_pattern
from actsparse.eval.flops import flop_report

needs_kernel = pytest.mark.skipif(not kernels.AVAILABLE, reason="compiled extension not built")
ISAS = [isa for isa in kernels.ISAS if kernels.AVAILABLE and kernels.gemm_isa(isa) == isa]
SELECT_ISAS = [isa for isa in kernels.ISAS if kernels.AVAILABLE and kernels.select_isa(isa) == isa]


def test_the_extension_is_built_where_a_compiler_exists():
    assert kernels.AVAILABLE or not shutil.which("cc"), "pip install found a C compiler but built no kernels"


def emulated(x, weight, bias, pattern, factor=None, eta=None):
    p = parse_pattern(pattern)
    scores = x.abs() if factor is None else x.abs() * factor
    y = F.linear(apply_pattern(x, scores, p), weight, bias)
    return y if eta is None else y + eta * weight.sum(1)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pattern", ["1:2", "2:4", "4:8", "8:16", "16:32", "3:6", "8:64"])
@pytest.mark.parametrize("tokens", [1, 3, 7, 13])  # 1 and 3 take the GEMV, 7 and 13 the GEMM
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_the_emulated_product(isa, pattern, tokens, bias):
    torch.manual_seed(0)
    p = parse_pattern(pattern)
    width, out = (
        3 * 128 + 96,
        180,
    )  # several input blocks (8:64 leaves a dense tail); wide and partial narrow panels
    x, weight = torch.randn(tokens, width), torch.randn(out, width)
    b = torch.randn(out) if bias else None
    factor = torch.rand(width) + 0.5
    y, compressed = kernels.sparse_linear(x, kernels.pack_linear(weight, b), p.n, p.m, factor, isa=isa)
    torch.testing.assert_close(y, emulated(x, weight, b, pattern, factor), rtol=1e-4, atol=1e-4)
    assert compressed.values.shape == (tokens, width // p.m * p.n + width % p.m) and not compressed.has_nan


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_a_dense_tail_and_the_shift_term_are_fused(isa):
    torch.manual_seed(1)
    x, weight, bias = torch.randn(2, 5, 200), torch.randn(70, 200), torch.randn(70)  # 200 = 12·16 + 8
    eta = x.median(-1, keepdim=True).values
    packed = kernels.pack_linear(weight, bias, weight.sum(1))
    y, compressed = kernels.sparse_linear(x - eta, packed, 8, 16, eta=eta, isa=isa)
    torch.testing.assert_close(y, emulated(x - eta, weight, bias, "8:16", eta=eta), rtol=1e-4, atol=1e-4)
    assert y.shape == (2, 5, 70) and compressed.values.shape == (10, 12 * 8 + 8)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pattern", ["8:16", "3:6"])
def test_wide_inputs_and_many_tokens_pass_every_stretch_and_chunk_of_the_gemm(threads, pattern):
    """Inputs wider than one stretch of blocks (2048 channels), a dense tail, and enough tokens for
    several chunks per panel: every regrouped block and every chunk's output rows are summed."""
    torch.manual_seed(3)
    p = parse_pattern(pattern)
    x, weight, bias = torch.randn(70, 4500), torch.randn(180, 4500) / 60, torch.randn(180)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, _ = kernels.sparse_linear(x, kernels.pack_linear(weight, bias), p.n, p.m)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(y, emulated(x, weight, bias, pattern), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pattern", ["2:4", "8:16", "16:32", "8:64"])
@pytest.mark.parametrize("tokens", [1, 2, 4, 9, 40])  # up to 4 the GEMV, beyond the GEMM
def test_bfloat16_weights_take_the_compiled_products_with_the_emulated_selection(isa, pattern, tokens):
    torch.manual_seed(2)
    p = parse_pattern(pattern)
    x, weight, bias = torch.randn(tokens, 448).bfloat16(), torch.randn(200, 448).bfloat16(), torch.randn(200)
    factor = (torch.rand(448) + 0.5).bfloat16()
    scores = x.abs() * factor  # rounded to bfloat16, as the emulated path rounds them
    eta = x.float().median(-1, keepdim=True).values.bfloat16()
    packed = kernels.pack_linear(weight, bias.bfloat16(), weight.float().sum(1))
    y, compressed = kernels.sparse_linear(x, packed, p.n, p.m, eta=eta, isa=isa, scores=scores)
    kept = apply_pattern(x, scores, p)
    expected = F.linear(
        kept.float(), weight.float(), bias.bfloat16().float()
    ) + eta.float() * weight.float().sum(1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    rebuilt = torch.zeros_like(x).scatter_(1, compressed.channels.long(), compressed.values.bfloat16())
    assert torch.equal(rebuilt, kept)


@needs_kernel
def test_the_stored_weight_is_one_transposed_copy_seen_as_the_weight():
    weight = torch.randn(70, 48)
    packed = kernels.pack_linear(weight)
    assert torch.equal(packed.weight, weight) and packed.weight.stride() == (1, packed.ld)
    assert packed.weight.untyped_storage().data_ptr() == packed.storage.untyped_storage().data_ptr()
    assert packed.ld >= packed.padded_out == 128 and not packed.storage[:, 70:].any()


@needs_kernel
@pytest.mark.parametrize("isa", SELECT_ISAS)
@pytest.mark.parametrize("pattern", ["1:2", "2:4", "4:8", "8:16", "16:32", "3:5"])
def test_compress_keeps_the_emulated_entries_in_channel_order(pattern, isa):
    p = parse_pattern(pattern)
    x = torch.randn(9, p.m * 8)
    x[:, 1::2] = x[:, ::2].neg()  # plant ties of |x|: the lower index wins
    compressed = kernels.nm_compress(x, None, p.n, p.m, isa=isa)
    rebuilt = torch.zeros_like(x).scatter_(1, compressed.channels.long(), compressed.values)
    assert torch.equal(rebuilt, apply_pattern(x, x.abs(), p))
    assert (compressed.channels.diff(dim=1) > 0).all()
    assert compressed.nonzero == int(torch.count_nonzero(rebuilt))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", SELECT_ISAS)
@pytest.mark.parametrize("pattern", ["2:4", "8:16", "16:32", "3:5"])
def test_half_precision_scores_keep_the_pytorch_mask_even_with_ties(dtype, isa, pattern):
    p = parse_pattern(pattern)
    generator = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 4, (3, 7, p.m * 6 + 1), generator=generator).to(dtype)  # ties; a tail
    x = torch.randn(scores.shape, generator=generator).to(dtype)
    x[0, 0, :4] = -0.0  # signed zeros kept as they are
    sparse, has_nan = kernels.nm_select_by_scores(x, scores, p.n, p.m, isa=isa)
    expected = apply_pattern(x, scores, p)
    assert torch.equal(sparse, expected) and not has_nan
    assert torch.equal(sparse.view(torch.int16), expected.view(torch.int16))
    scores[1, 2, 3] = float("nan")
    assert kernels.nm_select_by_scores(x, scores, p.n, p.m, isa=isa)[1]


needs_avx512 = pytest.mark.skipif(kernels.select_isa() != "avx512", reason="needs AVX-512")


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["1:2", "2:4", "4:8", "8:16", "16:32", "3:32", "29:32"])
def test_the_fused_half_precision_pass_rounds_scores_as_pytorch_and_keeps_its_entries(dtype, pattern):
    p = parse_pattern(pattern)
    generator = torch.Generator().manual_seed(p.m)
    width, tail = (p.m * 6 if p.m >= 16 else 48), min(3, p.m - 1)
    x = torch.randn(5, 3, width + tail, generator=generator).to(dtype)  # the tail stays dense
    x[0, 0, 1:width:2] = -x[0, 0, 0:width:2]  # plant ties of |x|: the lower index wins
    x[1, 0, :6] = -0.0  # signed zeros kept as they are
    factor = (torch.rand(width + tail, generator=generator) * 3).to(dtype)
    for weight_factor in (None, factor):
        scores = x.abs() if weight_factor is None else x.abs() * weight_factor  # rounded to dtype
        assert kernels.selects_16(x, p.m, weight_factor)
        sparse, kept, has_nan = kernels.nm_select(x, weight_factor, p.n, p.m)
        expected = apply_pattern(x, scores, p)
        assert torch.equal(sparse.view(torch.int16), expected.view(torch.int16)) and not has_nan
        assert kept == int(torch.count_nonzero(expected))
    x[2, 1, 7] = float("nan")
    assert kernels.nm_select(x, factor, p.n, p.m)[2]
    assert not kernels.selects_16(x, p.m, factor.float())  # a float32 factor rounds in float32


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_rank_with_the_compiled_pass_and_keep_the_same_inputs(
    llama, tokens, dtype, monkeypatch
):
    llama = llama.to(dtype)
    config = SparsityConfig(pattern="8:16", criterion="amber")
    fused = kernels.select_isa() == "avx512"  # one pass; elsewhere PyTorch scores, compiled ranking
    ranked = count_product_calls(monkeypatch, "actsparse_nm_select_16" if fused else "actsparse_nm_compress")
    with sparsify(llama, config) as handle:
        handle.measure_density(True)
        expected = logits(llama, tokens)
        density = flop_report(llama, handle).measured_density
    assert ranked and expected.dtype == dtype
    monkeypatch.setattr(kernels, "AVAILABLE", False)  # the PyTorch path: kthvalue
    with sparsify(llama, config) as handle:
        handle.measure_density(True)
        assert torch.equal(logits(llama, tokens), expected)
        assert flop_report(llama, handle).measured_density == density


@needs_kernel
@pytest.mark.parametrize("isa", SELECT_ISAS)
@pytest.mark.parametrize(
    "pattern",
    ["1:4", "3:4", "1:8", "7:8", "1:16", "5:16", "15:16", "16:16", "1:32", "7:32", "17:32", "31:32"],
)
def test_every_n_with_many_ties_matches_pytorch(pattern, isa):
    p = parse_pattern(pattern)
    x = torch.randint(-2, 3, (11, p.m * 6), generator=torch.Generator().manual_seed(3)).float()
    factor = torch.randint(1, 3, (p.m * 6,), generator=torch.Generator().manual_seed(4)).float()
    expected = apply_pattern(x, x.abs() * factor, p)
    assert torch.equal(kernels.nm_select(x, factor, p.n, p.m, isa=isa)[0], expected)
    compressed = kernels.nm_compress(x, factor, p.n, p.m, isa=isa)
    assert torch.equal(
        torch.zeros_like(x).scatter_(1, compressed.channels.long(), compressed.values), expected
    )


@needs_kernel
@pytest.mark.parametrize("isa", SELECT_ISAS)
@pytest.mark.parametrize("pattern", ["2:4", "8:16", "16:32", "3:5"])
def test_nan_inputs_are_reported_and_still_keep_n_per_group(pattern, isa):
    p = parse_pattern(pattern)
    x = torch.randn(3, p.m * 4)
    x[1, p.m : 2 * p.m] = float("nan")
    compressed = kernels.nm_compress(x, None, p.n, p.m, isa=isa)
    assert compressed.has_nan and compressed.channels.shape == (3, 4 * p.n)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@needs_kernel
@pytest.mark.parametrize("criterion", ["magnitude", "wina", "amber", "clact", "variance"])
@pytest.mark.parametrize("corrections", ["none", "shift"])
@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_models_give_the_emulated_logits(model, criterion, corrections, tokens, request):
    model = request.getfixturevalue(model)
    config = SparsityConfig(pattern="8:16", criterion=criterion, corrections=corrections, phase="all")
    with sparsify(model, config):
        expected = logits(model, tokens)
    with sparsify(model, replace(config, backend="cpu-kernel")) as handle:
        assert all(layer.state("backend") is not None for layer in handle.layers.values())
        torch.testing.assert_close(logits(model, tokens), expected, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize(
    "corrections", ["shift+learnable", "smoothquant+shift+learnable", "smoothquant+permute+shift+learnable"]
)
def test_learned_corrections_and_smoothing_run_through_the_kernel(llama, tokens, corrections):
    calibration = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    settings = CalibrationSettings(steps=3, lr=1e-3)
    config = SparsityConfig(pattern="2:4", corrections=corrections)
    handle = sparsify(llama, config, calibration, calibration_settings=settings)
    expected = logits(llama, tokens)
    recipe = handle.recipe()
    handle.remove()
    originals = {name: p.detach().clone() for name, p in llama.named_parameters()}
    with sparsify(llama, recipe=recipe.computed(backend="cpu-kernel")) as handle:
        assert all(layer.folded and layer.state("backend") is not None for layer in handle.layers.values())
        torch.testing.assert_close(logits(llama, tokens), expected, rtol=1e-4, atol=1e-4)
    for name, parameter in llama.named_parameters():  # folded after packing: each weight its own again
        assert parameter.is_contiguous() and torch.equal(parameter, originals[name]), name


@needs_kernel
def test_measured_density_is_counted_by_the_kernel(llama, tokens):
    densities = []
    for backend in ("emulated", "cpu-kernel"):
        with sparsify(llama, SparsityConfig(pattern="2:4", backend=backend)) as handle:
            handle.measure_density(True)
            logits(llama, tokens)
            densities.append(flop_report(llama, handle).measured_density)
    assert densities[0] == densities[1] == pytest.approx(0.5)


def decode_logits(model, tokens, steps=3):
    """Logits of a prefill of ``tokens`` and then ``steps`` one-token decode steps with the cache."""
    with torch.no_grad():
        out = model(tokens, use_cache=True)
        cache, step_logits = out.past_key_values, [out.logits]
        for step in range(steps):
            out = model(tokens[:, step : step + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step_logits.append(out.logits)
    return torch.cat(step_logits, dim=1)


def count_product_calls(monkeypatch, product="actsparse_nm_gemv"):
    calls = []
    compiled = getattr(kernels._LIBRARY, product)

    def counted(*args):
        calls.append(args[1])  # the call's tokens
        return compiled(*args)

    monkeypatch.setattr(kernels._LIBRARY, product, counted)
    return calls


@needs_kernel
@pytest.mark.parametrize("corrections", ["none", "shift"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_decode_steps_give_the_emulated_logits_through_the_gemv(
    model, corrections, batch, request, monkeypatch
):
    model = request.getfixturevalue(model)
    tokens = torch.randint(0, 128, (batch, 16), generator=torch.Generator().manual_seed(5))
    config = SparsityConfig(pattern="8:16", criterion="amber", corrections=corrections, phase="all")
    with sparsify(model, config):
        expected = decode_logits(model, tokens)
    calls = count_product_calls(monkeypatch)
    with sparsify(model, replace(config, backend="cpu-kernel")):
        torch.testing.assert_close(decode_logits(model, tokens), expected, rtol=1e-4, atol=1e-4)
    assert calls and set(calls) == {batch}  # every decode step of every layer, prefill on the GEMM


@needs_kernel
def test_decode_with_folded_learned_corrections_runs_through_the_gemv(llama, monkeypatch):
    calibration = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    settings = CalibrationSettings(steps=3, lr=1e-3)
    config = SparsityConfig(pattern="2:4", corrections="shift+learnable", phase="all")
    handle = sparsify(llama, config, calibration, calibration_settings=settings)
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    expected = decode_logits(llama, tokens)
    recipe = handle.recipe()
    handle.remove()
    calls = count_product_calls(monkeypatch)
    with sparsify(llama, recipe=recipe.computed(backend="cpu-kernel")):
        torch.testing.assert_close(decode_logits(llama, tokens), expected, rtol=1e-4, atol=1e-4)
    assert calls


@needs_kernel
@pytest.mark.parametrize("phase", ["prefill", "all"])
def test_one_weight_copy_while_attached_and_the_original_bit_for_bit_after_remove(llama, phase):
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    dense = decode_logits(llama, tokens)
    weights = {name: m.weight for name, m in llama.named_modules() if name.endswith("_proj")}
    originals = {name: w.detach().clone() for name, w in weights.items()}
    config = SparsityConfig(pattern="8:16", phase=phase)
    with sparsify(llama, config):
        emulated = decode_logits(llama, tokens)
    handle = sparsify(llama, replace(config, backend="cpu-kernel"))
    for name, layer in handle.layers.items():
        assert layer.weight is weights[name]  # the same Parameter, its data now the packed storage
        storage = layer.state("backend").packed.storage.untyped_storage()
        assert layer.weight.untyped_storage().data_ptr() == storage.data_ptr()
        assert torch.equal(layer.weight, originals[name])
    # under the prefill phase, decode steps are dense products computed from the packed storage
    torch.testing.assert_close(decode_logits(llama, tokens), emulated, rtol=1e-4, atol=1e-4)
    handle.remove()
    for name, weight in weights.items():
        assert weight.is_contiguous() and torch.equal(weight, originals[name])
    assert torch.equal(decode_logits(llama, tokens), dense)
    handle.attach()  # back to one copy
    assert all(
        layer.weight.untyped_storage().data_ptr() == layer.state("backend").packed.storage.untyped_storage().data_ptr()
        for layer in handle.layers.values()
    )
    handle.remove()


@needs_kernel
def test_a_failed_insert_leaves_the_original_weights_as_they_were(llama):
    llama.model.layers[1].mlp.down_proj = torch.nn.Linear(120, 64, bias=False)  # 120 is not a multiple of 16
    weights = {name: m.weight for name, m in llama.named_modules() if name.endswith("_proj")}
    with pytest.raises(ActsparseError, match="not a multiple"):
        sparsify(llama, SparsityConfig(pattern="8:16", backend="cpu-kernel"))
    assert all(weight.is_contiguous() for weight in weights.values())


@needs_kernel
def test_bfloat16_prefill_and_decode_run_compiled_and_keep_the_emulated_inputs(llama, monkeypatch):
    llama = llama.to(torch.bfloat16)
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    config = SparsityConfig(pattern="8:16", criterion="amber", phase="all")
    with sparsify(llama, config) as handle:
        handle.measure_density(True)
        expected = decode_logits(llama, tokens)
        emulated_density = flop_report(llama, handle).measured_density
    calls = count_product_calls(monkeypatch)
    gemm_calls = count_product_calls(monkeypatch, "actsparse_nm_gemm")
    with sparsify(llama, replace(config, backend="cpu-kernel")) as handle:
        handle.measure_density(True)
        got = decode_logits(llama, tokens)
        assert flop_report(llama, handle).measured_density == emulated_density
    assert calls and gemm_calls  # prefill (12 tokens) takes the GEMM, decode steps the GEMV
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


@needs_kernel
def test_nan_activations_are_reported_with_the_layer(llama, tokens):
    llama.model.embed_tokens.weight.data[:] = float("nan")
    with sparsify(llama, SparsityConfig(pattern="8:16", backend="cpu-kernel")):
        with pytest.raises(ActsparseError, match=r"layers\.0\..*NaN activations"):
            logits(llama, tokens)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pattern": "unstructured:0.5"}, "N:M patterns only"),
        ({"pattern": "64:128"}, "M up to 64"),
        ({"quant": "w8a8"}, "does not quantise"),
        ({"corrections": "shift+var"}, "var correction"),
        ({"backend": "gpu"}, "Unknown backend 'gpu'"),
    ],
)
def test_unsupported_backend_settings_are_refused(settings, message):
    with pytest.raises(ActsparseError, match=message):
        SparsityConfig(**{"backend": "cpu-kernel", **settings})

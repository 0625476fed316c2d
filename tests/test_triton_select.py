"""The fused Triton selection keeps exactly the PyTorch path's entries. Without a GPU, Triton's
interpreter (TRITON_INTERPRET=1, set in conftest.py) runs the kernel on the CPU; with one, the
same tests run it compiled on CUDA."""

import pytest
import torch

from actsparse import SparsityConfig, kernels, sparsify
from actsparse.core.ops import apply_pattern
from actsparse.core.patterns import parse_pattern
from actsparse.kernels import triton_select

pytest.importorskip("triton")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spelled", ["2:4", "8:16", "16:32", "4:8", "32:64"])
def test_the_fused_pass_keeps_the_pytorch_entries_on_tie_heavy_inputs(dtype, spelled):
    pattern = parse_pattern(spelled)
    generator = torch.Generator().manual_seed(pattern.m)
    # Few distinct values (many ties), a tail of 5 inputs that stays dense, signed zeros.
    x = (torch.randint(-4, 5, (3, 5, 64 * 3 + 5), generator=generator) * 0.25).to(DEVICE, dtype)
    x[0, 0, :9] = -0.0
    factor = (torch.rand(x.shape[-1], generator=generator) + 0.5).to(DEVICE, dtype)
    for weight_factor in (None, factor, factor.float()):
        scores = x.abs() if weight_factor is None else x.abs() * weight_factor
        expected = apply_pattern(x, scores, pattern)
        fused = triton_select.nm_select(x, pattern.n, pattern.m, factor=weight_factor)
        assert torch.equal(_bits(fused), _bits(expected)), weight_factor
        given = triton_select.nm_select(x, pattern.n, pattern.m, scores=scores)
        assert torch.equal(_bits(given), _bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("criterion", ["amber", "clact"])
def test_a_model_through_the_fused_pass_gives_the_pytorch_logits(
    monkeypatch, llama, tokens, dtype, criterion
):
    model, tokens = llama.to(DEVICE, dtype), tokens.to(DEVICE)
    config = SparsityConfig(pattern="8:16", criterion=criterion, corrections="shift")
    monkeypatch.setattr(kernels, "supports", lambda x, m: False)
    monkeypatch.setattr(kernels, "ranks_scores", lambda x, m: False)
    monkeypatch.setattr(triton_select, "supports", lambda x, m: False)  # the PyTorch path first
    with sparsify(model, config) as handle, torch.no_grad():
        handle.measure_density()
        reference = model(tokens, use_cache=False).logits
        density = [layer.measured_density for layer in handle.layers.values()]
        calls = []
        original = triton_select.nm_select

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(triton_select, "supports", lambda x, m: True)  # on the CPU: interpreted
        monkeypatch.setattr(triton_select, "nm_select", counted)
        handle.measure_density()
        fused = model(tokens, use_cache=False).logits
    assert calls and torch.equal(fused, reference)
    assert [layer.measured_density for layer in handle.layers.values()] == density

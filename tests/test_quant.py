import pytest
import torch

from actsparse import SparsityConfig, sparsify
from actsparse.core.quant import fake_quantize, quantize_activation, quantize_weight, smoothing_scale
from actsparse.pieces.corrections import SmoothQuant
from actsparse.pieces.policies import AmberRule


def test_int8_round_trip_error_is_at_most_half_a_step_and_values_lie_on_the_grid():
    x = torch.randn(16, 64) * torch.logspace(-2, 2, 16)[:, None]
    q = quantize_activation(x)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((q - x).abs() <= step / 2 + 1e-6 * step).all()
    codes = q / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3
    assert torch.equal(q.abs().amax(dim=-1), x.abs().amax(dim=-1))  # the largest value is exact


def test_weights_are_quantised_per_output_channel():
    w = torch.randn(8, 32)
    w[3] *= 100
    q = quantize_weight(w)
    assert torch.equal(q, fake_quantize(w, dim=1))
    assert (q[0] - w[0]).abs().max() <= w[0].abs().max() / 254 + 1e-6  # row 3's scale did not leak


def test_smoothing_leaves_dense_outputs_unchanged_before_quantisation(llama, tokens):
    with torch.no_grad():
        dense = llama(tokens, use_cache=False).logits
    for smooth in ("smoothquant", "outstanding"):
        with sparsify(llama, SparsityConfig(pattern="dense", corrections=smooth), tokens) as handle:
            layer = handle.layers["model.layers.0.mlp.down_proj"]
            scale = layer.state(smooth).value
            assert not torch.allclose(scale, torch.ones_like(scale))
            with torch.no_grad():
                torch.testing.assert_close(llama(tokens, use_cache=False).logits, dense, rtol=1e-4, atol=1e-4)


def test_outstanding_scale_is_the_inverse_and_widens_the_range():
    input_max = torch.tensor([10.0, 1.0, 0.1])
    w = torch.ones(2, 3)
    s = smoothing_scale(input_max, w, alpha=0.1)
    x = input_max[None]
    assert (x * s).max() / (x * s).min() > x.max() / x.min()  # outstanding: x / (1/s) = x · s
    assert (x / smoothing_scale(input_max, w, 0.5)).max() / (
        x / smoothing_scale(input_max, w, 0.5)
    ).min() < 100


def test_w8a8_alone_makes_nothing_sparse(llama, tokens):
    from actsparse import flop_report

    handle = sparsify(llama, SparsityConfig(pattern="dense", quant="w8a8"))
    assert all(layer.quantize and not layer.sparse for layer in handle.layers.values())
    assert flop_report(llama, handle).sparse_share == 0


def test_w8a8_with_exclusion_and_label(llama, tokens):
    config = SparsityConfig(
        pattern="8:16", corrections="outstanding", quant="w8a8", quant_exclude=("down_proj",)
    )
    handle = sparsify(llama, config, tokens)
    assert config.label == "8:16 amber outstanding w8a8" and config.corrections[0].smooth_alpha == 0.1
    assert not handle.layers["model.layers.0.mlp.down_proj"].quantize
    assert handle.layers["model.layers.0.mlp.up_proj"].quantize
    with torch.no_grad():
        assert torch.isfinite(llama(tokens, use_cache=False).logits).all()
    original = handle.originals["model.layers.0.mlp.up_proj"].weight
    handle.remove()
    assert llama.model.layers[0].mlp.up_proj.weight is original


def test_w8a8_under_a_policy_quantises_skipped_layers_too(llama, tokens):
    config = SparsityConfig(pattern="2:4", policy=AmberRule(flop_share=0.3), quant="w8a8")
    handle = sparsify(llama, config, tokens)
    k_proj = handle.layers["model.layers.0.self_attn.k_proj"]
    assert k_proj.quantize and not k_proj.sparse
    assert k_proj.nominal_density == 1.0


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_refused(alpha):
    from actsparse import ActsparseError

    with pytest.raises(ActsparseError, match="smooth_alpha"):
        SparsityConfig(corrections=(SmoothQuant(smooth_alpha=alpha),))


def test_outstanding_sparse_under_the_amber_policy(llama, tokens):
    config = SparsityConfig(
        pattern="8:16", policy=AmberRule(flop_share=0.3), corrections="outstanding", quant="w8a8"
    )
    handle = sparsify(llama, config, tokens)
    assert any(not layer.sparse for layer in handle.layers.values())
    assert all(layer.state("outstanding") is not None and layer.quantize for layer in handle.layers.values())

import pytest
import torch

from actsparse import SparsityConfig, flop_report, sparsify


def test_flop_share_by_hand(llama, tokens):
    # per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate 64x128, up 64x128, down 128x64
    per_layer = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)
    mlp = 2 * 3 * 64 * 128
    handle = sparsify(llama, SparsityConfig(pattern="2:4", criterion="magnitude", include=("mlp",)))
    report = flop_report(llama, handle)
    assert report.linear_flops_per_token == 2 * per_layer
    assert report.lm_head_flops_per_token == 2 * 64 * 128
    assert report.sparse_share == pytest.approx(mlp / per_layer)
    assert report.removed_share == pytest.approx(0.5 * mlp / per_layer)
    assert report.sparse_share_with_lm_head == pytest.approx(2 * mlp / (2 * per_layer + 2 * 64 * 128))
    assert report.measured_density is None


def test_measured_density_counts_real_zeros(llama, tokens):
    handle = sparsify(llama, SparsityConfig(pattern="2:4", criterion="magnitude"))
    handle.measure_density()
    with torch.no_grad():
        llama(tokens, use_cache=False)
    report = flop_report(llama, handle)
    assert report.measured_density == pytest.approx(0.5, abs=1e-3)
    assert all(layer.measured_density <= 0.5 for layer in report.layers)
    assert report.measured_removed_share == pytest.approx(0.5, abs=1e-3)


def test_dense_model_has_no_sparse_share(llama):
    assert flop_report(llama).sparse_share == 0

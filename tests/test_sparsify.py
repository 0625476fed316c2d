import pytest
import torch
from torch import nn

from actsparse import ActsparseError, SparsityConfig, sparsify
from actsparse.sparse.layer import SparseLinear


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def test_default_targets_are_the_decoder_projections_never_the_lm_head(llama):
    handle = sparsify(llama, SparsityConfig(pattern="2:4", criterion="magnitude"))
    names = sorted({name.rsplit(".", 1)[-1] for name in handle.layers})
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(handle.layers) == 14
    assert not isinstance(llama.lm_head, SparseLinear)
    assert isinstance(llama.model.layers[0].self_attn.q_proj, SparseLinear)


@pytest.mark.parametrize("criterion", ["magnitude", "wina", "amber", "clact", "variance"])
def test_remove_restores_bit_identical_logits(llama, tokens, criterion):
    dense = logits(llama, tokens)
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    handle = sparsify(llama, SparsityConfig(pattern="2:4", criterion=criterion))
    assert llama.state_dict().keys() == state.keys()
    assert not torch.equal(logits(llama, tokens), dense)
    handle.remove()
    assert torch.equal(logits(llama, tokens), dense)
    assert all(torch.equal(v, state[k]) for k, v in llama.state_dict().items())
    assert all(type(m) is not SparseLinear for m in llama.modules())


def test_sparse_layer_feeds_the_linear_exactly_n_of_m_inputs(llama, tokens):
    handle = sparsify(llama, SparsityConfig(pattern="4:8", criterion="amber"))
    layer = handle.layers["model.layers.1.mlp.down_proj"]
    seen = {}
    layer.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        llama(tokens, use_cache=False)
    x = seen["x"]
    sparse = layer.sparsify_input(x, layer.channel_factor)
    assert ((sparse != 0).reshape(-1, 8).sum(-1) <= 4).all()
    expected = torch.nn.functional.linear(sparse, layer.weight)
    torch.testing.assert_close(layer(x), expected)


def test_prefill_only_leaves_single_token_decode_dense(llama, tokens):
    prompt, step = tokens[:, :-1], tokens[:, -1:]
    with torch.no_grad():
        dense_prefill = llama(prompt, use_cache=True)
        dense_step = llama(step, past_key_values=dense_prefill.past_key_values, use_cache=True).logits
    handle = sparsify(llama, SparsityConfig(pattern="2:4", criterion="magnitude", phase="prefill"))
    with torch.no_grad():
        sparse_prefill = llama(prompt, use_cache=True)
        layer_outputs = {}
        layer = handle.layers["model.layers.0.mlp.up_proj"]
        layer.register_forward_hook(lambda m, args, out: layer_outputs.update(step=(args[0], out)))
        sparse_step = llama(step, past_key_values=sparse_prefill.past_key_values, use_cache=True).logits
    assert not torch.equal(sparse_prefill.logits, dense_prefill.logits)
    step_input, step_output = layer_outputs["step"]
    assert step_input.shape[-2] == 1
    assert torch.equal(step_output, torch.nn.functional.linear(step_input, layer.weight))  # dense call
    assert not torch.equal(sparse_step, dense_step)  # differs only through the sparse prompt's cache


def test_phase_all_sparsifies_single_token_calls(llama):
    handle = sparsify(llama, SparsityConfig(pattern="2:4", criterion="magnitude", phase="all"))
    layer = handle.layers["model.layers.0.mlp.up_proj"]
    x = torch.randn(1, 1, layer.in_features) + 5
    assert not torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))


def test_qwen2_biases_are_kept(qwen2, tokens):
    q_proj = qwen2.model.layers[0].self_attn.q_proj
    assert q_proj.bias is not None
    handle = sparsify(qwen2, SparsityConfig(pattern="8:16", criterion="magnitude"))
    layer = handle.layers["model.layers.0.self_attn.q_proj"]
    assert layer.bias is q_proj.bias
    x = torch.randn(1, 5, layer.in_features)
    torch.testing.assert_close(
        layer(x),
        torch.nn.functional.linear(layer.sparsify_input(x, layer.channel_factor), q_proj.weight, q_proj.bias),
    )


def test_include_and_exclude_filters(llama):
    handle = sparsify(
        llama, SparsityConfig(include=("mlp",), exclude=(r"layers\.0\.",), criterion="magnitude")
    )
    assert sorted(handle.layers) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_a_filter_that_matches_nothing_is_an_error(llama):
    with pytest.raises(ActsparseError, match="include filter 'attn_out' matches no linear layer"):
        sparsify(llama, SparsityConfig(include=("attn_out",)))
    with pytest.raises(ActsparseError, match="exclude filter 'lm_head' matches no linear layer"):
        sparsify(llama, SparsityConfig(exclude=("lm_head",)))
    with pytest.raises(ActsparseError, match="No linear layer is left"):
        sparsify(llama, SparsityConfig(exclude=("proj",)))


def test_invalid_regular_expression_is_an_error():
    with pytest.raises(ActsparseError, match="not a valid regular expression"):
        SparsityConfig(include=("q_proj(",))


def test_input_width_not_divisible_by_m_names_the_layer(llama, tokens):
    with pytest.raises(
        ActsparseError,
        match=r"Layer model\.layers\.0\.self_attn\.q_proj has 64 inputs, not a multiple of M=24",
    ):
        sparsify(llama, SparsityConfig(pattern="8:24"))
    handle = sparsify(llama, SparsityConfig(pattern="8:24", remainder="dense", criterion="magnitude"))
    layer = handle.layers["model.layers.0.self_attn.q_proj"]
    assert layer.nominal_density == pytest.approx((2 * 8 + 16) / 64)
    logits(llama, tokens)


def test_nan_activations_are_reported_with_the_layer(llama):
    handle = sparsify(llama, SparsityConfig(pattern="2:4"))
    layer = handle.layers["model.layers.0.mlp.down_proj"]
    for dtype in (torch.float32, torch.bfloat16):  # compiled pass and PyTorch path
        x = torch.randn(1, 3, layer.in_features, dtype=dtype)
        x[0, 1, 7] = float("nan")
        with pytest.raises(
            ActsparseError, match=r"Layer model\.layers\.0\.mlp\.down_proj received NaN activations"
        ):
            layer.sparsify_input(x, layer.channel_factor)


def test_handle_reattaches_the_same_layers_and_works_as_a_context(llama, tokens):
    dense = logits(llama, tokens)
    handle = sparsify(llama, SparsityConfig(pattern="2:4", criterion="amber"))
    sparse = logits(llama, tokens)
    handle.remove()
    with handle:
        assert torch.equal(logits(llama, tokens), sparse)
    assert torch.equal(logits(llama, tokens), dense)


def test_bfloat16_model(llama, tokens):
    llama = llama.to(torch.bfloat16)
    with sparsify(llama, SparsityConfig(pattern="8:16", criterion="wina")):
        assert logits(llama, tokens).dtype == torch.bfloat16


def test_config_round_trips_through_json():
    config = SparsityConfig(pattern="unstructured:0.5", criterion="clact", phase="all", exclude=("down",))
    assert SparsityConfig.from_dict(config.to_dict()) == config
    assert config.label == "unstructured:0.5 clact phase=all"  # a phase other than prefill is named


def test_linear_without_model_helpers_is_supported():
    model = nn.Sequential()
    model.add_module("up_proj", nn.Linear(16, 8))
    handle = sparsify(model, SparsityConfig(pattern="2:4", criterion="magnitude"))
    assert list(handle.layers) == ["up_proj"]


def test_a_second_handle_on_the_same_layers_is_refused_until_the_first_is_removed(llama, tokens):
    dense = logits(llama, tokens)
    first = sparsify(llama, SparsityConfig(pattern="2:4"))
    with pytest.raises(ActsparseError, match="already has sparse layers attached"):
        sparsify(llama, SparsityConfig(pattern="8:16"))
    first.remove()
    second = sparsify(llama, SparsityConfig(pattern="8:16"))
    with pytest.raises(ActsparseError, match="Another handle's sparse layers are attached"):
        first.attach()
    second.remove()
    with first:
        pass
    assert torch.equal(logits(llama, tokens), dense)  # every original layer is back

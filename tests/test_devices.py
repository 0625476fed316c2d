"""Devices: one device or an accelerate device map (offloaded layers included), batched passes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from actsparse import ActsparseError, SparsityConfig, sparsify
from actsparse.core.devices import check_device_map, input_device, offloaded, resolve_device
from actsparse.eval.baselines import WeightPruningConfig, prune_weights
from actsparse.eval.evaluate import evaluate
from actsparse.io.models import load_model, resolve_dtype
from actsparse.pipeline.phases import measure_sensitivity

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Block 1 offloaded to disk: its layers hold meta weights, loaded by accelerate's hooks per call.
OFFLOAD = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture
def offloaded_llama(llama, tmp_path):
    llama.save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", device_map=OFFLOAD, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    )
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@pytest.mark.parametrize("corrections", ["none", "smoothquant+shift", "permute", "learnable"])
def test_an_offloaded_model_is_sparsified_calibrated_and_restored_like_one_in_memory(
    llama, offloaded_llama, tokens, corrections
):
    down = offloaded_llama.model.layers[1].mlp.down_proj
    assert offloaded(down) and down.weight.device.type == "meta"
    dense = _logits(offloaded_llama, tokens)
    calibration = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(2))
    config = SparsityConfig(pattern="8:16", criterion="amber", corrections=corrections)
    in_memory = sparsify(llama, config, calibration, calibration_settings=None)
    handle = sparsify(offloaded_llama, config, calibration)
    sparse = _logits(offloaded_llama, tokens)
    assert not torch.equal(sparse, dense)
    torch.testing.assert_close(sparse, _logits(llama, tokens), rtol=1e-5, atol=1e-5)
    assert offloaded_llama.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # still offloaded
    rows = evaluate(offloaded_llama, tokens, [handle], progress=False)
    torch.testing.assert_close(
        rows[1].kl_to_dense,
        evaluate(llama, tokens, [in_memory], progress=False)[1].kl_to_dense,
        rtol=1e-4,
        atol=0,
    )
    assert offloaded_llama.model.layers[1].mlp.down_proj is down  # evaluate leaves it dense
    assert torch.equal(_logits(offloaded_llama, tokens), dense)  # restored bit for bit


def test_weight_pruning_refuses_offloaded_layers(offloaded_llama):
    with pytest.raises(ActsparseError, match="offloaded"):
        prune_weights(offloaded_llama, WeightPruningConfig(method="magnitude", pattern="2:4"))


def test_load_model_spreads_a_model_by_a_device_map(local_model, tmp_path):
    model, _ = local_model
    loaded, _ = load_model(str(model), device_map=OFFLOAD, offload_folder=tmp_path / "offload")
    assert offloaded(loaded.model.layers[1].self_attn.q_proj)
    assert not offloaded(loaded.model.layers[0].self_attn.q_proj)
    assert input_device(loaded) == torch.device("cpu")


def test_unknown_or_absent_devices_are_refused():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ActsparseError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ActsparseError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    with pytest.raises(ActsparseError, match="give one of them"):
        check_device_map("auto", "cpu")
    with pytest.raises(ActsparseError, match="Unknown device map"):
        check_device_map("everywhere", "auto")


def test_auto_dtype_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype("auto", "auto") == "float32"
    assert resolve_dtype("float16", "cuda") == "float16"


def test_batches_give_the_figures_of_one_window_at_a_time(llama):
    windows = torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(3))
    configs = [SparsityConfig(pattern="8:16", criterion="amber"), SparsityConfig(pattern="2:4")]
    one = evaluate(llama, windows, configs, progress=False)
    batched = evaluate(llama, windows, configs, progress=False, batch_size=2)  # 2 + 2 + 1 windows
    for a, b in zip(one, batched):
        assert b.perplexity == pytest.approx(a.perplexity, rel=1e-5)
        assert b.kl_to_dense == pytest.approx(a.kl_to_dense, rel=1e-4, abs=1e-7)
        assert b.top1_agreement == a.top1_agreement
        assert b.flops == a.flops
    config = SparsityConfig(pattern="2:4", corrections="smoothquant")
    one, batched = (measure_sensitivity(llama, config, windows, size)[0] for size in (1, 4))
    assert batched == pytest.approx(one, rel=1e-5)


@CUDA
@pytest.mark.cuda
def test_a_model_on_cuda_gives_the_cpu_figures(llama, tokens):
    config = SparsityConfig(pattern="8:16", criterion="amber", corrections="shift")
    cpu = evaluate(llama, tokens, [config], progress=False)
    gpu = evaluate(llama.to("cuda"), tokens, [config], progress=False)
    assert gpu[1].kl_to_dense == pytest.approx(cpu[1].kl_to_dense, rel=1e-3, abs=1e-5)
    assert gpu[1].flops["measured_density"] == pytest.approx(cpu[1].flops["measured_density"])

"""A new criterion, correction, policy and backend, each added from this file alone (no edit under
src/), run end to end through ``sparsify`` and ``evaluate``, and reachable by name from the config's
spelled-out form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from actsparse import SparsityConfig, evaluate, sparsify
from actsparse.config import config_settings, configs_from_settings
from actsparse.core.ops import nm_keep_mask
from actsparse.core.registry import setting
from actsparse.pieces.base import (
    BACKENDS,
    CORRECTIONS,
    CRITERIA,
    POLICIES,
    Backend,
    Correction,
    Criterion,
    LayerChoice,
    Policy,
)


@dataclass(frozen=True)
class ScaleKept(Correction):
    """Toy correction: multiply the kept values by a constant."""

    name: ClassVar[str] = "toy-scale"
    stage: ClassVar[int] = 40
    rescales_kept: ClassVar[bool] = True
    toy_gain: float = setting(2.0, "Toy: factor on the kept values.")

    def kept_values(self, layer, call, kept):
        return kept * self.toy_gain


@dataclass(frozen=True)
class FirstBlockOnly(Policy):
    """Toy policy: only the layers of the first decoder block."""

    name: ClassVar[str] = "toy-first-block"

    def choose(self, choice: LayerChoice) -> list[str]:
        return [name for name in choice.flops if ".layers.0." in name]


class Float64(Backend):
    """Toy backend: the emulated product in float64, counting its sparse calls."""

    name: ClassVar[str] = "toy-float64"
    description: ClassVar[str] = "emulated in float64"
    calls = 0

    def refusal(self, config: SparsityConfig) -> str | None:
        return (
            "keeps N:M patterns only; choose an N:M pattern" if config.parsed_pattern.unstructured else None
        )

    def sparse(self, layer, call):
        Float64.calls += 1
        kept = layer.sparsify_input(call.input, call.factor)
        for correction in layer.corrections:
            kept = correction.kept_values(layer, call, kept)
        operands = layer.operands()
        bias = None if operands.bias is None else operands.bias.double()
        y = F.linear(kept.double(), operands.weight.double(), bias)
        if call.eta is not None:
            y = y + call.eta.double() * operands.row_sum.double()
        return y.to(call.input.dtype)


TOY_CRITERION = Criterion("toy-row-sum", "|x| · Σ_i |W_ij|", weight_factor=lambda w: w.abs().sum(dim=0))


@pytest.fixture
def toys():
    CRITERIA.register(TOY_CRITERION)
    CORRECTIONS.register(ScaleKept)
    POLICIES.register(FirstBlockOnly)
    BACKENDS.register(Float64())
    yield
    CRITERIA.unregister(TOY_CRITERION.name)
    CORRECTIONS.unregister(ScaleKept.name)
    POLICIES.unregister(FirstBlockOnly.name)
    BACKENDS.unregister(Float64.name)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def test_a_toy_criterion_runs_end_to_end(toys, llama, tokens):
    config = SparsityConfig(pattern="2:4", criterion="toy-row-sum")
    with sparsify(llama, config) as handle:
        layer = handle.layers["model.layers.0.mlp.up_proj"]
        expected = layer.weight.abs().sum(dim=0)
        torch.testing.assert_close(layer.channel_factor, expected)
        x = torch.randn(1, 5, layer.in_features)
        kept = x * nm_keep_mask(x.abs() * expected, 2, 4)  # the toy score, ranked by the reference op
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(kept, layer.weight, layer.bias))
    rows = evaluate(
        llama, tokens, [config, SparsityConfig(pattern="2:4", criterion="magnitude")], progress=False
    )
    assert rows[1].label == "2:4 toy-row-sum" and rows[1].kl_to_dense > 0


def test_a_toy_correction_runs_end_to_end_with_its_own_setting(toys, llama, tokens):
    (config,) = configs_from_settings({"pattern": "2:4", "corrections": "shift+toy-scale", "toy_gain": "3"})
    assert config.corrections[-1] == ScaleKept(toy_gain=3.0)
    assert config.label == "2:4 amber shift+toy-scale toy_gain=3.0"
    assert SparsityConfig.from_dict(config.to_dict()) == config
    assert "toy_gain" in {s.name for s in config_settings()}
    plain = SparsityConfig(pattern="2:4", corrections="shift")
    with sparsify(llama, plain):
        expected = logits(llama, tokens)
    with sparsify(llama, config):
        assert not torch.allclose(logits(llama, tokens), expected)
    rows = evaluate(llama, tokens, [config, plain], progress=False)
    assert rows[1].kl_to_dense > rows[2].kl_to_dense  # tripling the kept values hurts
    with pytest.raises(Exception, match="does not rescale the kept values; drop the toy-scale correction"):
        SparsityConfig(pattern="2:4", corrections="toy-scale", backend="cpu-kernel")


def test_a_toy_policy_runs_end_to_end(toys, llama, tokens):
    config = SparsityConfig(pattern="2:4", policy="toy-first-block")
    with sparsify(llama, config) as handle:
        sparse = [name for name, layer in handle.layers.items() if layer.sparse]
    assert sparse and all(".layers.0." in name for name in sparse) and len(sparse) == 7
    (row,) = evaluate(llama, tokens, [config], progress=False)[1:]
    assert row.label == "2:4 amber policy=toy-first-block"
    assert 0 < row.flops["sparse_share"] < 1


def test_a_toy_backend_runs_end_to_end(toys, llama, tokens):
    config = SparsityConfig(pattern="8:16", criterion="wina", corrections="shift", backend="toy-float64")
    Float64.calls = 0
    with sparsify(llama, SparsityConfig(pattern="8:16", criterion="wina", corrections="shift")):
        expected = logits(llama, tokens)
    with sparsify(llama, config):
        torch.testing.assert_close(logits(llama, tokens), expected, rtol=1e-4, atol=1e-4)
    assert Float64.calls == 14  # every sparsified layer, once
    rows = evaluate(llama, tokens, [config], progress=False)
    assert rows[1].label == "8:16 wina shift toy-float64" and rows[1].kl_to_dense > 0
    with pytest.raises(Exception, match="The toy-float64 backend keeps N:M patterns only"):
        SparsityConfig(pattern="unstructured:0.5", backend="toy-float64")

"""Weight N:M pruning baselines on the same target layers: magnitude, Wanda and
SparseGPT, so that weight and activation sparsity compare row for row in one evaluation.

In every output row, each group of M consecutive input columns keeps N weights:
- ``magnitude``: the largest ``|W_ij|``;
- ``wanda``: the largest ``|W_ij| · ‖X_:,j‖₂`` (input norms over the calibration tokens);
- ``sparsegpt``: chosen by ``W_ij² / [H⁻¹]_jj²`` block by block (128 columns), each pruned weight's
  error spread over the columns still to come with the inverse Hessian ``H = 2XᵀX`` (1% damping).
Calibration inputs come from the dense model (all layers observed in one pass), not from the
already-pruned earlier layers as in the sequential SparseGPT recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from actsparse.calibration.measure import observe_inputs
from actsparse.config import DEFAULT_TARGETS, SparsityConfig
from actsparse.core.devices import offloaded
from actsparse.core.errors import ActsparseError
from actsparse.core.ops import nm_keep_mask
from actsparse.core.patterns import Pattern
from actsparse.core.registry import Registry
from actsparse.sparse.density import DensityCounter
from actsparse.sparse.targets import target_layers


@dataclass(frozen=True)
class WeightPruningConfig:
    """One weight-pruning setting: ``method`` at ``pattern`` (N:M) on the layers the filters select."""

    method: str = "wanda"
    pattern: str = "2:4"
    include: tuple[str, ...] = (DEFAULT_TARGETS,)
    exclude: tuple[str, ...] = ()
    blocksize: int = 128
    damping: float = 0.01

    def __post_init__(self) -> None:
        WEIGHT_PRUNING.get(self.method)
        # Validates the pattern and the filters the same way activation sparsity does.
        pattern = SparsityConfig(
            pattern=self.pattern, include=self.include, exclude=self.exclude
        ).parsed_pattern
        if pattern.unstructured or pattern.dense:
            raise ActsparseError(f"Weight pruning takes an N:M pattern such as 2:4, not '{self.pattern}'.")
        object.__setattr__(self, "pattern", str(pattern))
        if self.blocksize % pattern.m:
            raise ActsparseError(
                f"blocksize {self.blocksize} is not a multiple of M={pattern.m}; use e.g. 128."
            )

    @property
    def label(self) -> str:
        return f"weights {self.pattern} {self.method}"

    @property
    def needs_calibration(self) -> bool:
        return WEIGHT_PRUNING.get(self.method).needs_calibration

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "include": list(self.include), "exclude": list(self.exclude)}


@dataclass
class PrunedWeight:
    """One pruned layer, as the FLOP report reads it: its weights keep ``nominal_density``."""

    original: torch.Tensor
    pruned: torch.Tensor
    nominal_density: float
    sparse: bool = True

    @property
    def measured_density(self) -> float:
        return float(torch.count_nonzero(self.pruned)) / self.pruned.numel()


@dataclass
class WeightPruningHandle:
    """Pruned weights, swapped in and out of the model's layers (``attach`` / ``remove``)."""

    model: nn.Module
    config: WeightPruningConfig
    layers: dict[str, PrunedWeight]
    attached: bool = False
    prepare_seconds: float | None = None  # ``record_preparation``, by ``prepare_variants``

    @property
    def label(self) -> str:
        return self.config.label

    def describe(self) -> dict[str, Any]:
        return {"kind": "weights", **self.config.to_dict()}

    def _set(self, which: str) -> None:
        for name, layer in self.layers.items():
            self.model.get_submodule(name).weight.data = getattr(layer, which)

    def attach(self) -> WeightPruningHandle:
        if not self.attached:
            self._set("pruned")
            self.attached = True
        return self

    def remove(self) -> None:
        if self.attached:
            self._set("original")
            self.attached = False

    def record_preparation(self, seconds: float) -> None:
        """Keep how long pruning took (``prepare_variants``)."""
        self.prepare_seconds = seconds

    def measure_density(self, enabled: bool = True) -> dict[str, DensityCounter]:
        """Weight density needs no counting: it is read from the pruned tensors (no counters)."""
        return {}

    def __enter__(self) -> WeightPruningHandle:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask of Wanda: top ``n`` of ``|W_ij| · ‖X_:,j‖₂`` in each group of ``m`` columns of a row."""
    return nm_keep_mask(weight.abs().float() * input_norm.float(), n, m)


def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, blocksize: int = 128, damping: float = 0.01
) -> torch.Tensor:
    """SparseGPT's N:M pruning of ``weight`` ``(out, in)`` with the input Hessian ``(in, in)``."""
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damping * torch.diag(h).mean() * torch.eye(h.shape[0])
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    columns = w.shape[1]
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block, block_inv = w[:, start:end].clone(), h_inv[start:end, start:end]
        errors = torch.zeros_like(block)
        keep = torch.ones_like(block, dtype=torch.bool)
        for i in range(end - start):
            if i % m == 0:
                saliency = block[:, i : i + m] ** 2 / torch.diag(block_inv)[i : i + m] ** 2
                keep[:, i : i + m] = nm_keep_mask(saliency, n, m)
            column = block[:, i]
            kept = column * keep[:, i]
            error = (column - kept) / block_inv[i, i]
            block[:, i:] -= error[:, None] * block_inv[i, i:][None, :]
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return w.to(weight.dtype)


def prune_weights(
    model: nn.Module,
    config: WeightPruningConfig,
    calibration: torch.Tensor | None = None,
    batch_size: int = 1,
) -> WeightPruningHandle:
    """Prune the weights of ``config``'s target layers to N:M and return the handle (attached);
    Wanda and SparseGPT observe ``calibration`` ``batch_size`` windows at a time."""
    selection = SparsityConfig(pattern=config.pattern, include=config.include, exclude=config.exclude)
    layers, pattern = target_layers(model, selection), selection.parsed_pattern
    if any(offloaded(layer) for layer in layers.values()):
        raise ActsparseError(
            "Weight pruning rewrites weights in place, and some target layers are offloaded to CPU "
            "memory or disk (--device-map); load the model where it fits whole, or compare activation "
            "sparsity only."
        )
    for name, layer in layers.items():
        if layer.in_features % pattern.m:
            raise ActsparseError(
                f"Layer {name} has {layer.in_features} inputs, not a multiple of M={pattern.m}; "
                "choose an M that divides it or exclude the layer."
            )
    method = WEIGHT_PRUNING.get(config.method)
    statistics: dict[str, Any] = {}
    if method.needs_calibration:
        observe_inputs(
            model,
            calibration,
            layers,
            lambda name, x: method.observe(statistics, name, x),
            f"{config.method} statistics",
            batch_size=batch_size,
        )
    pruned = {}
    for name, layer in layers.items():
        weight = layer.weight.data
        new = method.prune(weight, statistics.pop(name, None), pattern, config)
        pruned[name] = PrunedWeight(original=weight, pruned=new, nominal_density=pattern.density)
    return WeightPruningHandle(model, config, pruned).attach()


class PruningMethod:
    """One weight-pruning method: what it observes of each target layer's inputs on calibration text
    (when ``needs_calibration``), and the N:M-pruned weight it makes of that."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = True

    def observe(self, statistics: dict[str, Any], name: str, x: torch.Tensor) -> None:
        """Add the inputs ``x`` ``(tokens, in)`` of layer ``name`` to ``statistics[name]``."""

    def prune(
        self, weight: torch.Tensor, statistics: Any, pattern: Pattern, config: WeightPruningConfig
    ) -> torch.Tensor:
        """``weight`` pruned to ``pattern``, from the layer's ``statistics`` (None without any)."""
        raise NotImplementedError


WEIGHT_PRUNING: Registry[PruningMethod] = Registry("weight-pruning method")
"""The weight-pruning methods by name; add one with ``WEIGHT_PRUNING.register(MyMethod())``."""


class Magnitude(PruningMethod):
    name: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False

    def prune(
        self, weight: torch.Tensor, statistics: Any, pattern: Pattern, config: WeightPruningConfig
    ) -> torch.Tensor:
        return weight * nm_keep_mask(weight.abs(), pattern.n, pattern.m)


class Wanda(PruningMethod):
    name: ClassVar[str] = "wanda"

    def observe(self, statistics: dict[str, Any], name: str, x: torch.Tensor) -> None:
        statistics[name] = statistics.get(name, 0) + x.float().pow(2).sum(dim=0)

    def prune(
        self, weight: torch.Tensor, statistics: Any, pattern: Pattern, config: WeightPruningConfig
    ) -> torch.Tensor:
        return weight * wanda_mask(weight, statistics.sqrt(), pattern.n, pattern.m)


class SparseGpt(PruningMethod):
    name: ClassVar[str] = "sparsegpt"

    def observe(self, statistics: dict[str, Any], name: str, x: torch.Tensor) -> None:
        x = x.float()
        hessian, tokens = statistics.get(name, (0, 0))
        statistics[name] = (hessian + 2 * x.T @ x, tokens + x.shape[0])

    def prune(
        self, weight: torch.Tensor, statistics: Any, pattern: Pattern, config: WeightPruningConfig
    ) -> torch.Tensor:
        hessian, tokens = statistics
        return sparsegpt_prune(
            weight, hessian / tokens, pattern.n, pattern.m, config.blocksize, config.damping
        )


for _method in (Magnitude(), Wanda(), SparseGpt()):
    WEIGHT_PRUNING.register(_method)

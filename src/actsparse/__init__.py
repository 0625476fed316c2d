"""actsparse: post-training N:M activation sparsity for Hugging Face causal language models."""

from actsparse.config import CalibrationSettings, SparsityConfig
from actsparse.core.errors import ActsparseError
from actsparse.core.patterns import Pattern, parse_pattern
from actsparse.eval.evaluate import evaluate
from actsparse.eval.flops import flop_report
from actsparse.io.models import load_model
from actsparse.io.recipe import Recipe, load_recipe
from actsparse.pipeline.phases import SparsityHandle, sparsify
from actsparse.version import __version__

__all__ = [
    "ActsparseError",
    "CalibrationSettings",
    "Pattern",
    "Recipe",
    "SparsityConfig",
    "SparsityHandle",
    "evaluate",
    "flop_report",
    "load_model",
    "load_recipe",
    "parse_pattern",
    "sparsify",
    "__version__",
]

"""actsparse: post-training N:M activation sparsity for Hugging Face causal language models."""

__version__ = "0.1.0"

from actsparse.calibrate import CalibrationSettings
from actsparse.config import SparsityConfig
from actsparse.errors import ActsparseError
from actsparse.evaluate import evaluate
from actsparse.flops import flop_report
from actsparse.models import load_model
from actsparse.patterns import Pattern, parse_pattern
from actsparse.recipe import Recipe, load_recipe
from actsparse.sparsify import SparsityHandle, sparsify

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
]

"""The version of actsparse (results and recipes record it)."""

__version__ = "0.1.0"

"""Compiled helpers, loaded with ctypes on tensor buffers (no build against PyTorch's C++ ABI).

``nm_select`` is the fused select-and-zero pass for float32 N:M patterns. When the extension was not
built (no compiler at install time), ``AVAILABLE`` is False and actsparse uses its PyTorch path.
"""

from __future__ import annotations

import ctypes
import importlib.util

import torch

MAX_GROUP = 64


def _load() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("actsparse.kernels._nm_select")
    if spec is None or spec.origin is None:
        return None
    library = ctypes.CDLL(spec.origin)
    function = library.actsparse_nm_select_f32
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.POINTER(ctypes.c_int32)]
    return library


_LIBRARY = _load()
AVAILABLE = _LIBRARY is not None


def supports(x: torch.Tensor, m: int) -> bool:
    """True when ``nm_select`` can take ``x`` with group size ``m`` (and no gradient is needed)."""
    return (
        AVAILABLE
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and m <= MAX_GROUP
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def nm_select(x: torch.Tensor, factor: torch.Tensor | None, n: int, m: int) -> tuple[torch.Tensor, int, bool]:
    """Keep the top ``n`` of every ``m`` scores ``|x| * factor`` along the last dimension of ``x``.

    Same result as ``actsparse.ops.apply_pattern`` (ties to the lower index, a tail shorter than
    ``m`` kept dense). Returns the sparse tensor, its number of non-zeros, and whether ``x`` held NaN.
    """
    x = x.contiguous()
    factor = None if factor is None else factor.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    has_nan = ctypes.c_int32(0)
    width = x.shape[-1]
    kept = _LIBRARY.actsparse_nm_select_f32(
        x.data_ptr(),
        None if factor is None else factor.data_ptr(),
        out.data_ptr(),
        x.numel() // width,
        width,
        n,
        m,
        torch.get_num_threads(),
        ctypes.byref(has_nan),
    )
    if kept < 0:
        raise ValueError(f"nm_select does not support {n}:{m}")
    return out, kept, bool(has_nan.value)

"""Compiled helpers, loaded with ctypes on tensor buffers (no build against PyTorch's C++ ABI).

- ``nm_select``: the fused select-and-zero pass for float32 N:M patterns, and for bfloat16 and
  float16 with AVX-512 (groups of 2 to 32); ``nm_select_by_scores``, bfloat16 and float16 inputs
  selected by scores computed elsewhere (the emulated backend).
- ``pack_linear`` and ``sparse_linear``: the ``cpu-kernel`` backend, a linear layer that multiplies
  only the kept activations: a fused select-and-compress pass, then a sparse GEMM (many tokens) or a
  sparse GEMV that reads only the kept inputs' weight rows (a few tokens), both in float32 or
  bfloat16 (summing in float32) over the weight stored once, transposed (``nm_gemm.c``).

When the extension was not built (no compiler at install time), ``AVAILABLE`` is False and actsparse
uses its PyTorch path.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from dataclasses import dataclass

import torch

MAX_GROUP = 64
ISAS = ("portable", "avx2", "avx512")
"""Instruction sets of the compiled selection and sparse GEMM, narrowest first."""

_POINTER, _INT = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "actsparse_nm_select_f32": (_INT, [_POINTER] * 3 + [_INT] * 5 + [ctypes.POINTER(ctypes.c_int32), _INT]),
    "actsparse_nm_select_16": (_INT, [_POINTER] * 3 + [_INT] * 5 + [ctypes.POINTER(ctypes.c_int32), _INT]),
    "actsparse_output_unit": (_INT, []),
    "actsparse_gemm_isa": (_INT, [_INT]),
    "actsparse_select_isa": (_INT, []),
    "actsparse_gemv_max_tokens": (_INT, []),
    "actsparse_take_values": (_INT, [_POINTER] + [_INT] * 2 + [_POINTER, _INT]),
    "actsparse_nm_compress": (_INT, [_POINTER] * 3 + [_INT] * 5 + [ctypes.POINTER(ctypes.c_int32), _INT]),
    "actsparse_gemm_work_size": (_INT, [_INT] * 4),
    "actsparse_keep_16": (None, [_POINTER] + [_INT] * 2 + [_POINTER] * 2 + [_INT] * 2),
    "actsparse_nm_gemm": (
        None,
        [_POINTER] + [_INT] * 5 + [_POINTER] + [_INT] * 3 + [_POINTER] * 5 + [_INT] * 2,
    ),
    "actsparse_nm_gemv": (
        None,
        [_POINTER] + [_INT] * 3 + [_POINTER] + [_INT] * 3 + [_POINTER] * 5 + [_INT] * 2,
    ),
}


def _load() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("actsparse.kernels._nm_select")
    if spec is None or spec.origin is None:
        return None
    library = ctypes.CDLL(spec.origin)
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
    return library


_LIBRARY = _load()
AVAILABLE = _LIBRARY is not None
OUTPUT_UNIT = _LIBRARY.actsparse_output_unit() if AVAILABLE else 0
"""The packed weight's output width is a multiple of this (panels of 128 outputs, the last maybe 64)."""
GEMV_MAX_TOKENS = _LIBRARY.actsparse_gemv_max_tokens() if AVAILABLE else 0
"""Calls of at most this many tokens take the sparse GEMV (decode); longer ones the sparse GEMM."""
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
"""Weights the kernels multiply with (both products sum in float32)."""


def gemm_isa(limit: str = "avx512") -> str | None:
    """The instruction set the sparse GEMM uses on this CPU (at most ``limit``); None if not built."""
    return ISAS[_LIBRARY.actsparse_gemm_isa(ISAS.index(limit))] if AVAILABLE else None


def select_isa(limit: str = "avx512") -> str | None:
    """The instruction set of the compiled selection on this CPU (at most ``limit``): "avx512" or
    "avx2" (groups of 2, 4, 8, 16 and 32), or "portable" (a plain loop, several times slower);
    None if not built."""
    return ISAS[min(_LIBRARY.actsparse_select_isa(), ISAS.index(limit))] if AVAILABLE else None


def _takes(x: torch.Tensor, m: int, dtypes: tuple[torch.dtype, ...]) -> bool:
    """True when a compiled pass can take ``x`` with group size ``m``: built, one of ``dtypes``, on
    the CPU, and no gradient needed."""
    return (
        AVAILABLE
        and x.dtype in dtypes
        and x.device.type == "cpu"
        and m <= MAX_GROUP
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def supports(x: torch.Tensor, m: int) -> bool:
    """True when the compiled selection can take ``x`` with group size ``m`` (and no gradient is needed)."""
    return _takes(x, m, (torch.float32,))


def ranks_scores(x: torch.Tensor, m: int) -> bool:
    """True when ``nm_select_by_scores`` takes ``x`` (bfloat16 or float16, whose scores' float32
    copies are exact) with group size ``m`` on the CPU (and no gradient is needed)."""
    return _takes(x, m, (torch.bfloat16, torch.float16))


_KINDS_16 = {torch.bfloat16: 1, torch.float16: 2}


def selects_16(x: torch.Tensor, m: int, factor: torch.Tensor | None) -> bool:
    """True when ``nm_select`` takes ``x`` (bfloat16 or float16 on the CPU, no gradient needed)
    with group size ``m`` and ``factor``: AVX-512 here, M of 2, 4, 8, 16 or 32 over a body of whole
    16-input blocks, and a factor of ``x``'s dtype (or none), so scores round in that dtype."""
    body = x.shape[-1] - x.shape[-1] % m
    return (
        ranks_scores(x, m)
        and select_isa() == "avx512"
        and m in (2, 4, 8, 16, 32)
        and body % 16 == 0
        and (factor is None or (factor.dtype == x.dtype and factor.device == x.device))
    )


def nm_select_by_scores(
    x: torch.Tensor, scores: torch.Tensor, n: int, m: int, isa: str = "avx512"
) -> tuple[torch.Tensor, bool]:
    """``x`` (bfloat16 or float16) with all but the top ``n`` of every ``m`` ``scores`` along the
    last dimension zeroed (ties to the lower index, a tail shorter than ``m`` kept whole), the
    scores ranked by the compiled pass on a float32 copy (exact); and whether the scores held NaN.
    The same result as ``actsparse.core.ops.apply_pattern(x, scores, ...)``."""
    width, rows = x.shape[-1], _rows(x)
    compressed = nm_compress(scores.reshape(rows, width).to(torch.float32), None, n, m, scratch=True, isa=isa)
    x = x.contiguous()
    out = torch.empty_like(x)
    _LIBRARY.actsparse_keep_16(
        compressed.entries.data_ptr(), rows, compressed.entries.shape[1], x.data_ptr(), out.data_ptr(), width,
        min(torch.get_num_threads(), rows),
    )  # fmt: skip
    return out, compressed.has_nan


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


_THREAD = threading.local()


def _scratch(size: int, name: str = "scratch") -> torch.Tensor:
    """``size`` floats of this thread's scratch buffer ``name``, grown as needed and kept between calls."""
    buffer = getattr(_THREAD, name, None)
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(size, dtype=torch.float32)
        setattr(_THREAD, name, buffer)
    return buffer[:size]


def nm_select(
    x: torch.Tensor, factor: torch.Tensor | None, n: int, m: int, isa: str = "avx512"
) -> tuple[torch.Tensor, int, bool]:
    """Keep the top ``n`` of every ``m`` scores ``|x| * factor`` along the last dimension of ``x``.

    Same result as ``actsparse.core.ops.apply_pattern`` (ties to the lower index, a tail shorter than
    ``m`` kept dense). Returns the sparse tensor, its number of non-zeros, and whether ``x`` held NaN.
    Float32 ``x`` (``supports``) is scored in float32 and ``isa`` caps the instruction set (for
    tests); bfloat16 and float16 ``x`` (``selects_16``: AVX-512) are scored with a factor of their
    dtype, rounded as PyTorch rounds ``|x| * factor`` in that dtype.
    """
    x = x.contiguous()
    if x.dtype == torch.float32:
        select, last = _LIBRARY.actsparse_nm_select_f32, ISAS.index(isa)
        factor = None if factor is None else factor.to(torch.float32)
    else:
        select, last = _LIBRARY.actsparse_nm_select_16, _KINDS_16[x.dtype]
    factor = None if factor is None else factor.contiguous()
    out = torch.empty_like(x)
    has_nan = ctypes.c_int32(0)
    rows = _rows(x)
    kept = select(
        x.data_ptr(),
        None if factor is None else factor.data_ptr(),
        out.data_ptr(),
        rows,
        x.shape[-1],
        n,
        m,
        min(torch.get_num_threads(), rows),  # threads share out the rows
        ctypes.byref(has_nan),
        last,
    )
    if kept < 0:
        raise ValueError(f"nm_select does not take {n}:{m} over {x.shape[-1]} {x.dtype} inputs here")
    return out, kept, bool(has_nan.value)


@dataclass(frozen=True)
class CompressedRows:
    """Each row's kept inputs in channel order, as (value, channel) pairs: ``entries`` is
    ``rows × kept × 2`` float32 whose second column holds int32 channel numbers."""

    entries: torch.Tensor
    nonzero: int
    has_nan: bool

    @property
    def values(self) -> torch.Tensor:
        return self.entries[..., 0]

    @property
    def channels(self) -> torch.Tensor:
        return self.entries.view(torch.int32)[..., 1]


def nm_compress(
    x: torch.Tensor,
    factor: torch.Tensor | None,
    n: int,
    m: int,
    scratch: bool = False,
    isa: str = "avx512",
) -> CompressedRows:
    """The fused select-and-compress pass: for every row of ``x`` (``(..., in)``, float32), the
    top ``n`` of every ``m`` scores ``|x| * factor`` as values and channels (ties to the lower
    index; a tail shorter than ``m`` kept whole).

    ``scratch=True`` writes into this thread's reusable buffer (no fresh pages per call), which the
    next such call overwrites; ``isa`` caps the instruction set (for tests).
    """
    x = x.contiguous()
    factor = None if factor is None else factor.to(torch.float32).contiguous()
    width, rows = x.shape[-1], _rows(x)
    body = width - width % m
    kept = body // m * n + width - body
    entries = _scratch(rows * kept * 2) if scratch else torch.empty(rows * kept * 2, dtype=torch.float32)
    entries = entries.view(rows, kept, 2)
    has_nan = ctypes.c_int32(0)
    nonzero = _LIBRARY.actsparse_nm_compress(
        x.data_ptr(),
        None if factor is None else factor.data_ptr(),
        entries.data_ptr(),
        rows,
        width,
        n,
        m,
        min(torch.get_num_threads(), rows),  # threads share out the rows
        ctypes.byref(has_nan),
        ISAS.index(isa),
    )
    if nonzero < 0:
        raise ValueError(f"nm_compress does not support {n}:{m}")
    return CompressedRows(entries, nonzero, bool(has_nan.value))


@dataclass(frozen=True)
class PackedLinear:
    """A linear layer's weight stored once for the compiled products: transposed, ``storage[k, o]
    = W[o, k]``, in rows of ``ld`` values (the output width padded to a multiple of
    ``OUTPUT_UNIT``, plus a skew that spreads a block's rows over the cache's sets), zero past the
    last output; bias and row sums padded the same way, in float32 (None where the layer has none).
    ``weight`` is the same storage seen as the ``(out, in)`` weight."""

    storage: torch.Tensor
    out_features: int
    in_features: int
    bias: torch.Tensor | None
    row_sum: torch.Tensor | None

    @property
    def padded_out(self) -> int:
        return _padded_width(self.out_features)

    @property
    def ld(self) -> int:
        return self.storage.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight as a view of the storage (strides ``(1, ld)``)."""
        return self.storage[:, : self.out_features].t()


_SKEW = 16
"""Extra floats per stored row, so that rows a power of two apart do not share cache sets."""


def _padded_width(out_features: int) -> int:
    return -(-out_features // OUTPUT_UNIT) * OUTPUT_UNIT


def packs(weight: torch.Tensor) -> bool:
    """True when ``pack_linear`` takes ``weight`` (float32 or bfloat16 on the CPU)."""
    return AVAILABLE and weight.dtype in WEIGHT_DTYPES and weight.device.type == "cpu"


def pack_linear(
    weight: torch.Tensor, bias: torch.Tensor | None = None, row_sum: torch.Tensor | None = None
) -> PackedLinear:
    """Store ``weight`` (``out × in``, float32 or bfloat16) once for ``sparse_linear``, keeping its
    dtype; ``row_sum`` is ``W.sum(1)`` of the shift correction (its ``η · W.sum(1)`` term is added
    inside the product). The result's ``weight`` equals ``weight`` value for value."""
    out_features, in_features = weight.shape
    padded_out = _padded_width(out_features)
    storage = torch.zeros(in_features, padded_out + _SKEW, dtype=weight.dtype)
    storage[:, :out_features].copy_(weight.detach().t())

    def padded(vector: torch.Tensor | None) -> torch.Tensor | None:
        if vector is None:
            return None
        return torch.nn.functional.pad(vector.detach().to(torch.float32), (0, padded_out - out_features))

    return PackedLinear(storage, out_features, in_features, padded(bias), padded(row_sum))


def runs(x: torch.Tensor, m: int, packed: PackedLinear) -> bool:
    """True when ``sparse_linear`` takes ``x`` with group size ``m`` on ``packed``: inputs of the
    weight's dtype on the CPU, no gradient needed."""
    return _takes(x, m, (packed.storage.dtype,))


def sparse_linear(
    x: torch.Tensor,
    packed: PackedLinear,
    n: int,
    m: int,
    factor: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    isa: str = "avx512",
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, CompressedRows]:
    """``F.linear(x_sparse, W, bias) (+ eta · W.sum(1))`` multiplying only the kept activations,
    where ``x_sparse`` keeps the top ``n`` of every ``m`` scores ``|x| * factor`` of each token
    (or of ``scores``, given in full, e.g. computed in bfloat16 as the emulated path does).

    ``x`` is ``(..., in)`` of the packed weight's dtype (see ``runs``); calls of at most
    ``GEMV_MAX_TOKENS`` tokens read only the weight rows of their kept inputs (the sparse GEMV),
    longer ones take the sparse GEMM. ``eta`` (``(..., 1)``) needs ``packed`` built with
    ``row_sum``; ``isa`` caps the instruction set (for tests). Returns the output (``x``'s dtype)
    and the compressed input (its non-zero count and NaN flag; its entries live in a scratch
    buffer the next call reuses).
    """
    rows = _rows(x)
    values = x.reshape(rows, x.shape[-1]).to(torch.float32)
    if scores is None:
        compressed = nm_compress(values, factor, n, m, scratch=True, isa=isa)
    else:
        compressed = nm_compress(
            scores.reshape(values.shape).to(torch.float32), None, n, m, scratch=True, isa=isa
        )
        values = values.contiguous()
        entries, in_width = compressed.entries, values.shape[-1]
        nonzero = _LIBRARY.actsparse_take_values(
            entries.data_ptr(), rows, entries.shape[1], values.data_ptr(), in_width
        )
        compressed = CompressedRows(entries, nonzero, compressed.has_nan)
    kept = compressed.entries.shape[1]
    y = torch.empty(rows, packed.padded_out, dtype=torch.float32)
    if eta is not None:
        eta = eta.reshape(rows).to(torch.float32).contiguous()
    bias = None if packed.bias is None else packed.bias.data_ptr()
    eta_pointer = None if eta is None else eta.data_ptr()
    row_sum = None if eta is None else packed.row_sum.data_ptr()
    threads, units = torch.get_num_threads(), packed.padded_out // OUTPUT_UNIT
    if rows <= GEMV_MAX_TOKENS:
        # working space for the union of several tokens' kept inputs
        work = _scratch(packed.in_features * (rows + 1), "work") if rows > 1 else None
        _LIBRARY.actsparse_nm_gemv(
            compressed.entries.data_ptr(), rows, kept, packed.in_features,
            packed.storage.data_ptr(), int(packed.storage.dtype == torch.bfloat16), packed.ld, units,
            bias, eta_pointer, row_sum, y.data_ptr(), None if work is None else work.data_ptr(),
            threads, ISAS.index(isa),
        )  # fmt: skip
    else:
        work = _scratch(_LIBRARY.actsparse_gemm_work_size(rows, kept, units, threads), "work")
        _LIBRARY.actsparse_nm_gemm(
            compressed.entries.data_ptr(), rows, kept, packed.in_features, n, m,
            packed.storage.data_ptr(), int(packed.storage.dtype == torch.bfloat16), packed.ld, units,
            bias, eta_pointer, row_sum, y.data_ptr(), work.data_ptr(), threads, ISAS.index(isa),
        )  # fmt: skip
    if packed.padded_out != packed.out_features:
        y = y[:, : packed.out_features]
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.out_features), compressed

"""Single-level 2D Haar wavelet transform (DWT) and its inverse (IWT) in torch.

Works on any two axes of a tensor of any rank and dtype (bf16 included), is differentiable, and needs no
convolution: the transform is a sum/difference of the four polyphase components taken by strided slicing.

Convention (matches ``pywt.dwt2(x, "haar")`` / ``pywt.idwt2`` on ``axes=dims``)
---------------------------------------------------------------------------------
With ``dims = (d0, d1)`` ("rows" = ``d0``, "columns" = ``d1``), the 2x2 block at rows (2i, 2i+1) and columns
(2j, 2j+1) holding ``[[a, b], [c, d]]`` maps to::

    LL = (a + b + c + d) / 2      pywt cA   low along d0,  low along d1
    LH = (a + b - c - d) / 2      pywt cH   high along d0, low along d1   ("horizontal" detail)
    HL = (a - b + c - d) / 2      pywt cV   low along d0,  high along d1  ("vertical" detail)
    HH = (a - b - c + d) / 2      pywt cD   high along d0, high along d1  ("diagonal" detail)

i.e. ``(LL, LH, HL, HH) == (cA, cH, cV, cD)``, the order pywt returns them in. The letters read "filter along
the columns (d1), then filter along the rows (d0)", the usual image-processing naming, and it is the order the
authors' ``DWT_2D`` (WaveCNet) and ``pytorch_wavelets`` return. Signs follow pywt: the Haar detail is
``(first - second) / sqrt(2)`` (pywt's ``dec_hi = [-1/sqrt2, 1/sqrt2]`` applied as a convolution).

Odd sizes
---------
An odd axis of length ``n`` is padded by repeating its last sample once (to ``n + 1``) before the transform, so the
sub-bands have ``ceil(n / 2)`` samples. For Haar this is exactly pywt's default ``mode="symmetric"`` (the half-sample
symmetric extension of length 1), so the coefficients equal ``pywt.dwt2`` for odd sizes too. The inverse produces
the even (padded) size and crops to ``size`` when it is given (pywt's ``idwt2`` does not crop; ``waverec2`` does), so
``haar_idwt2(*haar_dwt2(x), size=x.shape[d0], x.shape[d1])`` returns ``x`` for every size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["HaarDWT2d", "HaarIDWT2d", "haar_dwt2", "haar_idwt2"]

Dims = tuple[int, int]


def _normalize_dims(dims: Sequence[int], ndim: int) -> Dims:
    if len(dims) != 2:
        raise ValueError(f"dims must name two axes, got {tuple(dims)}")
    d0, d1 = (d % ndim if -ndim <= d < ndim else None for d in dims)
    if d0 is None or d1 is None:
        raise ValueError(f"dims {tuple(dims)} out of range for a tensor with {ndim} dims")
    if d0 == d1:
        raise ValueError(f"dims must be two different axes, got {tuple(dims)}")
    return d0, d1


def _pad_to_even(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Repeat the last sample along ``dim`` when its length is odd (== pywt 'symmetric' for Haar)."""
    n = x.shape[dim]
    if n % 2 == 0:
        return x
    return torch.cat([x, x.narrow(dim, n - 1, 1)], dim=dim)


def _take(x: torch.Tensor, d0: int, d1: int, r: int, c: int) -> torch.Tensor:
    """The polyphase component ``x[..., r::2 (along d0), ..., c::2 (along d1), ...]`` (a view)."""
    index = [slice(None)] * x.ndim
    index[d0] = slice(r, None, 2)
    index[d1] = slice(c, None, 2)
    return x[tuple(index)]


def _interleave(even: torch.Tensor, odd: torch.Tensor, dim: int) -> torch.Tensor:
    """Interleave two equal-shape tensors along ``dim``: out[2k] = even[k], out[2k + 1] = odd[k]."""
    return torch.stack([even, odd], dim=dim + 1).flatten(dim, dim + 1)


def haar_dwt2(
    x: torch.Tensor, dims: Sequence[int] = (-2, -1)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-level 2D Haar DWT of ``x`` over the axes ``dims``.

    Args:
        x: any shape ``(..., n0, ..., n1, ...)`` with ``n0 = x.shape[dims[0]]``, ``n1 = x.shape[dims[1]]``;
            any floating dtype.
        dims: the two axes to transform (rows, columns); negative values allowed.

    Returns:
        ``(ll, lh, hl, hh)``, each shaped like ``x`` with ``n0 -> ceil(n0 / 2)`` and ``n1 -> ceil(n1 / 2)``;
        equal to pywt's ``(cA, cH, cV, cD)`` (see the module docstring).
    """
    d0, d1 = _normalize_dims(dims, x.ndim)
    x = _pad_to_even(_pad_to_even(x, d0), d1)
    a, b = _take(x, d0, d1, 0, 0), _take(x, d0, d1, 0, 1)
    c, d = _take(x, d0, d1, 1, 0), _take(x, d0, d1, 1, 1)
    # A butterfly along d1, then one along d0; their two 1/sqrt(2) factors are folded into one final 1/2.
    s_top, d_top = a + b, a - b  # along d1, row 2i
    s_bot, d_bot = c + d, c - d  # along d1, row 2i + 1
    ll = (s_top + s_bot) * 0.5
    lh = (s_top - s_bot) * 0.5
    hl = (d_top + d_bot) * 0.5
    hh = (d_top - d_bot) * 0.5
    return ll, lh, hl, hh


def haar_idwt2(
    ll: torch.Tensor,
    lh: torch.Tensor,
    hl: torch.Tensor,
    hh: torch.Tensor,
    dims: Sequence[int] = (-2, -1),
    size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Inverse of :func:`haar_dwt2`.

    Args:
        ll, lh, hl, hh: sub-bands of equal shape ``(..., m0, ..., m1, ...)`` (``m0``, ``m1`` on ``dims``), ordered
            as pywt's ``(cA, cH, cV, cD)``. Broadcastable shapes are accepted.
        dims: the two axes the sub-bands were computed over.
        size: ``(n0, n1)``, the original lengths along ``dims``. The output is cropped to it; each must be
            ``2 * m - 1`` or ``2 * m``. ``None`` returns the full ``(2 * m0, 2 * m1)`` (what ``pywt.idwt2`` returns).

    Returns:
        ``x`` shaped like the sub-bands with ``m0 -> n0`` and ``m1 -> n1``.
    """
    ll, lh, hl, hh = torch.broadcast_tensors(ll, lh, hl, hh)
    d0, d1 = _normalize_dims(dims, ll.ndim)
    # The transpose of haar_dwt2 (the orthonormal Haar matrix's inverse): undo the butterflies along d0,
    # then along d1, then put the four polyphase components back in place.
    s_top, s_bot = (ll + lh) * 0.5, (ll - lh) * 0.5
    d_top, d_bot = (hl + hh) * 0.5, (hl - hh) * 0.5
    a, b = s_top + d_top, s_top - d_top
    c, d = s_bot + d_bot, s_bot - d_bot
    top = _interleave(a, b, d1)  # row 2i
    bot = _interleave(c, d, d1)  # row 2i + 1
    x = _interleave(top, bot, d0)
    if size is not None:
        n0, n1 = (int(s) for s in size)
        for dim, n in ((d0, n0), (d1, n1)):
            full = x.shape[dim]
            if n not in (full, full - 1):
                raise ValueError(f"size {n} along dim {dim} does not fit sub-bands of length {full // 2}")
            x = x.narrow(dim, 0, n)
    return x


class HaarDWT2d(nn.Module):
    """``nn.Module`` wrapper of :func:`haar_dwt2` (no parameters, no buffers)."""

    def __init__(self, dims: Sequence[int] = (-2, -1)):
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return haar_dwt2(x, self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class HaarIDWT2d(nn.Module):
    """``nn.Module`` wrapper of :func:`haar_idwt2` (no parameters, no buffers)."""

    def __init__(self, dims: Sequence[int] = (-2, -1)):
        super().__init__()
        self.dims = tuple(dims)

    def forward(
        self,
        ll: torch.Tensor,
        lh: torch.Tensor,
        hl: torch.Tensor,
        hh: torch.Tensor,
        size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        return haar_idwt2(ll, lh, hl, hh, dims=self.dims, size=size)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"

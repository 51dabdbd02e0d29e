"""Haar DWT/IWT in torch against pywt, perfect reconstruction, odd sizes, gradients, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from singer.models.wavelet import HaarDWT2d, HaarIDWT2d, haar_dwt2, haar_idwt2

# (shape, dims): last two axes, other axes, reversed order, 2-D, odd sizes.
EVEN_CASES = [
    ((4, 6), (-2, -1)),
    ((2, 3, 8, 6), (-2, -1)),
    ((2, 8, 3, 10), (1, 3)),
    ((2, 8, 3, 10), (-3, -1)),
    ((6, 5, 4), (-1, 0)),
    ((2, 2, 4, 4, 2), (0, 2)),
]
ODD_CASES = [
    ((5, 7), (-2, -1)),
    ((2, 3, 9, 6), (-2, -1)),
    ((2, 7, 3, 10), (1, 3)),
    ((2, 8, 3, 11), (1, 3)),
    ((3, 1, 1), (1, 2)),
]


def _pywt_bands(x: np.ndarray, dims) -> list[np.ndarray]:
    ca, (ch, cv, cd) = pywt.dwt2(x, "haar", axes=dims)  # default mode "symmetric"
    return [ca, ch, cv, cd]


def _sizes(x: torch.Tensor, dims) -> tuple[int, int]:
    return x.shape[dims[0]], x.shape[dims[1]]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape,dims", EVEN_CASES + ODD_CASES)
def test_dwt_matches_pywt(shape, dims, dtype, atol):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = haar_dwt2(x.to(dtype), dims)
    ref = _pywt_bands(x.numpy(), dims)
    for o, r in zip(ours, ref, strict=True):
        assert o.dtype == dtype
        assert tuple(o.shape) == r.shape
        np.testing.assert_allclose(o.double().numpy(), r, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape,dims", EVEN_CASES + ODD_CASES)
def test_idwt_matches_pywt(shape, dims, dtype, atol):
    """Random sub-bands (not only those of a signal): our inverse == pywt.idwt2 (full, uncropped size)."""
    x = torch.randn(*shape, dtype=torch.float64)
    bands = [torch.randn_like(b) for b in haar_dwt2(x, dims)]
    ours = haar_idwt2(*(b.to(dtype) for b in bands), dims=dims)
    b = [t.numpy() for t in bands]
    ref = pywt.idwt2((b[0], (b[1], b[2], b[3])), "haar", axes=dims)
    assert tuple(ours.shape) == ref.shape
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=0, atol=atol)
    # Cropped to an odd size: pywt's waverec2 crops the same way (drops the last sample).
    if any(n % 2 for n in _sizes(x, dims)):
        cropped = haar_idwt2(*(t.to(dtype) for t in bands), dims=dims, size=_sizes(x, dims))
        idx = [slice(None)] * x.ndim
        for d in dims:
            idx[d] = slice(0, x.shape[d])
        np.testing.assert_allclose(cropped.double().numpy(), ref[tuple(idx)], rtol=0, atol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape,dims", EVEN_CASES + ODD_CASES)
def test_perfect_reconstruction(shape, dims, dtype, atol):
    x = torch.randn(*shape, dtype=dtype)
    y = haar_idwt2(*haar_dwt2(x, dims), dims=dims, size=_sizes(x, dims))
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, x, rtol=0, atol=atol)


def test_odd_size_is_symmetric_padding():
    """An odd axis behaves as if its last sample were repeated (pywt 'symmetric' for a length-2 filter)."""
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    padded = torch.cat([x, x[:, -1:]], dim=1)
    padded = torch.cat([padded, padded[..., -1:]], dim=2)
    for a, b in zip(haar_dwt2(x), haar_dwt2(padded), strict=True):
        assert a.shape == (2, 3, 4)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The last row/column of the detail bands along a padded axis is zero.
    _, lh, hl, hh = haar_dwt2(x)
    assert torch.all(lh[:, -1] == 0) and torch.all(hl[..., -1] == 0) and torch.all(hh[:, -1] == 0)


def test_sub_band_convention_by_hand():
    """[[a, b], [c, d]] -> LL=(a+b+c+d)/2, LH=(a+b-c-d)/2 (pywt cH), HL=(a-b+c-d)/2 (cV), HH=(a-b-c+d)/2."""
    x = torch.tensor([[0.0, 1.0], [4.0, 9.0]], dtype=torch.float64)
    ll, lh, hl, hh = (t.item() for t in haar_dwt2(x))
    assert (ll, lh, hl, hh) == (7.0, -6.0, -3.0, 2.0)
    ca, (ch, cv, cd) = pywt.dwt2(x.numpy(), "haar")
    assert np.allclose([ca.item(), ch.item(), cv.item(), cd.item()], [ll, lh, hl, hh])


def test_size_validation_and_dims_validation():
    bands = haar_dwt2(torch.randn(1, 6, 6))
    with pytest.raises(ValueError):
        haar_idwt2(*bands, size=(4, 6))
    with pytest.raises(ValueError):
        haar_dwt2(torch.randn(4, 4), dims=(0, 0))
    with pytest.raises(ValueError):
        haar_dwt2(torch.randn(4, 4), dims=(0, 2))


def test_gradcheck():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)

    def roundtrip_bands(t):
        return haar_dwt2(t, dims=(0, 2))

    assert torch.autograd.gradcheck(roundtrip_bands, (x,))
    bands = tuple(torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(lambda *b: haar_idwt2(*b, dims=(1, 2), size=(3, 5)), bands)


def test_bf16_and_fp16_run():
    x = torch.randn(2, 4, 9, 10)
    for dtype in (torch.bfloat16, torch.float16):
        bands = haar_dwt2(x.to(dtype))
        assert all(b.dtype == dtype for b in bands)
        for got, want in zip(bands, haar_dwt2(x), strict=True):
            torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)
        y = haar_idwt2(*bands, size=(9, 10))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), x, rtol=2e-2, atol=5e-2)


def test_modules_wrap_functions_and_hold_no_state():
    dwt, idwt = HaarDWT2d(dims=(1, 3)), HaarIDWT2d(dims=(1, 3))
    assert list(dwt.state_dict()) == [] and list(idwt.state_dict()) == []
    assert list(dwt.parameters()) == [] and list(dwt.buffers()) == []
    x = torch.randn(2, 7, 3, 6)
    bands = dwt(x)
    for a, b in zip(bands, haar_dwt2(x, (1, 3)), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(idwt(*bands, size=(7, 6)), x, rtol=0, atol=1e-6)

"""Min-max rescaling (``structkd.losses.minmax_normalize``): the closed-form gradient against
autograd, the [0, 1] range, constant maps and error messages."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import F64
from torch.autograd import gradcheck

from structkd.losses import minmax_normalize


@pytest.mark.parametrize("mode", ["minmax", "minmax_channel"])
def test_minmax_gradient_closed_form(mode) -> None:
    """The closed-form backward equals autograd through amin/amax (gradcheck, float64)."""
    x = torch.randn(2, 3, 4, 5, dtype=F64, requires_grad=True)
    assert gradcheck(lambda t: minmax_normalize(t, mode), (x,))


@pytest.mark.parametrize("mode", ["minmax", "minmax_channel"])
def test_minmax_range_and_constant_maps(mode) -> None:
    x = torch.randn(2, 3, 4, 5, dtype=F64) * 7 + 3
    z = minmax_normalize(x, mode)
    dims = (2, 3) if mode == "minmax_channel" else (1, 2, 3)
    assert torch.allclose(z.amin(dim=dims), torch.zeros((), dtype=F64), atol=1e-12)
    assert torch.allclose(z.amax(dim=dims), torch.ones((), dtype=F64), atol=1e-6)
    const = torch.full((2, 3, 4, 5), 4.0, requires_grad=True)
    zc = minmax_normalize(const, mode)
    assert torch.equal(zc, torch.zeros_like(zc))
    zc.sum().backward()
    assert torch.isfinite(const.grad).all()
    assert minmax_normalize(x, None) is x


def test_minmax_errors() -> None:
    with pytest.raises(ValueError, match=r"normalize='zscore' is not supported"):
        minmax_normalize(torch.rand(1, 1, 2, 2), "zscore")
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\), got shape \(2, 2\)"):
        minmax_normalize(torch.rand(2, 2), "minmax")


@pytest.mark.parametrize("seed", range(40))
def test_blockwise_extremes_equal_min_max_with_indices(seed) -> None:
    """``_extreme`` equals ``rows.min/max(dim=1)``, first-occurrence index included, with ties
    (few distinct values), constant rows and NaN."""
    from structkd.losses.normalize import _extreme

    g = torch.Generator().manual_seed(seed)
    r, n1, n2 = torch.randint(1, 6, (3,), generator=g).tolist()
    x = torch.randint(-2, 3, (r, n1, n2), generator=g).float()
    if seed % 5 == 0:
        x.view(-1)[int(torch.randint(0, x.numel(), (1,), generator=g))] = float("nan")
    if seed % 7 == 0:
        x.fill_(3.0)
    rows = x.reshape(r, -1)
    for largest in (False, True):
        value, index = _extreme(x, largest=largest)
        v_ref, i_ref = rows.max(dim=1) if largest else rows.min(dim=1)
        assert torch.equal(index, i_ref)
        assert torch.allclose(value, v_ref, equal_nan=True)

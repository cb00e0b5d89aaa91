"""Attention transfer (rdd_lightning.losses.at) against explicit per-pixel loops in float64."""

from __future__ import annotations

import math

import pytest
import torch

from rdd_lightning.losses import attention_map, attention_transfer_loss
from tests.test_kd import explicit_bilinear


def ref_attention(f: torch.Tensor) -> torch.Tensor:
    """[B, 1, h, w] float64: channel mean of squares, one pixel at a time."""
    f = f.detach().double()
    B, C, h, w = f.shape
    out = torch.empty(B, 1, h, w, dtype=torch.float64)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                out[b, 0, i, j] = sum(float(f[b, c, i, j]) ** 2 for c in range(C)) / C
    return out


def ref_at(fs: torch.Tensor, ft: torch.Tensor) -> float:
    a_t = ref_attention(ft)
    h, w = a_t.shape[-2:]
    a_s = ref_attention(fs)
    if a_s.shape[-2:] != (h, w):
        a_s = explicit_bilinear(a_s, h, w)
    B = a_t.shape[0]
    total = 0.0
    for b in range(B):
        qs, qt = a_s[b].flatten().tolist(), a_t[b].flatten().tolist()
        ns, nt = math.sqrt(sum(v * v for v in qs)), math.sqrt(sum(v * v for v in qt))
        total += sum((x / ns - y / nt) ** 2 for x, y in zip(qs, qt, strict=True))
    return total / (B * h * w)


def test_attention_map_is_channel_mean_of_squares():
    f = torch.randn(2, 5, 3, 4)
    a = attention_map(f)
    assert a.shape == (2, 1, 3, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a.double(), ref_attention(f), atol=1e-6, rtol=1e-6)


def test_at_matches_reference_with_different_channels():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 3, 3, 4, generator=g), torch.randn(2, 7, 3, 4, generator=g)
    loss = attention_transfer_loss(fs, ft)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_at(fs, ft), rel=1e-5)


def test_at_resizes_student_attention_to_teacher():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 5, 4, 5, generator=g)
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(ref_at(fs, ft), rel=1e-5)


def test_at_zero_for_identical_and_for_scaled_features():
    f = torch.randn(2, 4, 3, 3)
    assert attention_transfer_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # the maps are normalised: a global scale of the teacher's feature changes nothing
    assert attention_transfer_loss(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-7)
    assert attention_transfer_loss(f, torch.randn(2, 4, 3, 3)).item() > 1e-4


def test_at_gradient_only_to_student():
    fs = torch.randn(2, 3, 3, 3, requires_grad=True)
    ft = torch.randn(2, 4, 3, 3, requires_grad=True)
    attention_transfer_loss(fs, ft).backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0


def test_at_rejects_bad_shapes():
    with pytest.raises(ValueError, match="batch size"):
        attention_transfer_loss(torch.zeros(1, 2, 2, 2), torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        attention_transfer_loss(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2, 2))

"""Tests of the pixel KD loss (rdd_lightning.losses.kd) against hand values and direct KL computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rdd_lightning.losses import pixel_kd_loss
from rdd_lightning.losses.kd import pixel_kd_loss as pixel_kd_loss_direct


def direct_kd(zs: torch.Tensor, zt: torch.Tensor, T: float) -> float:
    """T^2 * sum KL(p_t || p_s) / (B*h*w) via F.kl_div in float64 (student already at teacher size)."""
    zs, zt = zs.detach().double(), zt.detach().double()
    B, _, h, w = zt.shape
    kl = F.kl_div(F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1), reduction="sum", log_target=True)
    return T * T * kl.item() / (B * h * w)


def explicit_bilinear(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """align_corners=True bilinear resize written out per output pixel (float64)."""
    x = x.detach().double()
    B, C, h, w = x.shape
    out = torch.empty(B, C, H, W, dtype=torch.float64)
    for i in range(H):
        sy = i * (h - 1) / (H - 1) if H > 1 else 0.0
        y0 = min(int(sy), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(W):
            sx = j * (w - 1) / (W - 1) if W > 1 else 0.0
            x0 = min(int(sx), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, :, i, j] = (1 - fy) * ((1 - fx) * x[:, :, y0, x0] + fx * x[:, :, y0, x1]) + fy * (
                (1 - fx) * x[:, :, y1, x0] + fx * x[:, :, y1, x1]
            )
    return out


def test_package_exports_kd_loss():
    assert pixel_kd_loss is pixel_kd_loss_direct


def test_kd_hand_computed_one_pixel():
    # teacher softmax [3/4, 1/4], student [1/2, 1/2]: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    zt = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    zs = torch.zeros(1, 2, 1, 1)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert pixel_kd_loss(zs, zt).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_matches_kl_div(T):
    g = torch.Generator().manual_seed(0)
    zs, zt = 3 * torch.randn(2, 5, 3, 4, generator=g), 3 * torch.randn(2, 5, 3, 4, generator=g)
    loss = pixel_kd_loss(zs, zt, temperature=T)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(direct_kd(zs, zt, T), rel=1e-5)


def test_kd_zero_for_identical_logits():
    z = 4 * torch.randn(2, 6, 3, 3)
    assert pixel_kd_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert pixel_kd_loss(z, z.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-5)


def test_kd_temperature_squared_scaling():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g)
    T = 3.0
    # softening by T then multiplying by T^2
    assert pixel_kd_loss(zs, zt, T).item() == pytest.approx(
        T**2 * pixel_kd_loss(zs / T, zt / T, 1.0).item(), rel=1e-5
    )


def test_kd_resizes_student_to_teacher_resolution():
    g = torch.Generator().manual_seed(2)
    zs = 2 * torch.randn(2, 3, 2, 3, generator=g)
    zt = 2 * torch.randn(2, 3, 4, 5, generator=g)
    expected = direct_kd(explicit_bilinear(zs, 4, 5), zt, 2.0)
    assert pixel_kd_loss(zs, zt, temperature=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_gradient_only_to_student():
    zs = torch.randn(2, 3, 2, 2, requires_grad=True)
    zt = torch.randn(2, 3, 2, 2, requires_grad=True)
    pixel_kd_loss(zs, zt).backward()
    assert zt.grad is None
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    # analytic gradient of the mean KL w.r.t. student logits: (p_s - p_t) / (B*h*w)
    expected = (torch.softmax(zs.detach(), 1) - torch.softmax(zt.detach(), 1)) / 8
    torch.testing.assert_close(zs.grad, expected, atol=1e-6, rtol=1e-5)


def test_kd_autocast_bf16_is_float32():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pixel_kd_loss(zs.bfloat16(), zt.bfloat16(), 2.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        direct_kd(zs.bfloat16().float(), zt.bfloat16().float(), 2.0), rel=1e-5
    )
    assert loss.item() == pytest.approx(direct_kd(zs, zt, 2.0), rel=3e-2)


def test_kd_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        pixel_kd_loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), temperature=0.0)
    with pytest.raises(ValueError, match="classes"):
        pixel_kd_loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 3, 1, 1))


def test_one_fp32_helper_for_rdd_and_every_loss():
    import importlib

    from rdd_lightning import rdd
    from rdd_lightning.losses._precision import fp32_scope

    assert rdd._fp32_scope is fp32_scope
    for name in ("kd", "task", "cwd", "at", "fitnet", "dist", "skd", "ifvd", "dsd", "cirkd"):
        module = importlib.import_module(f"rdd_lightning.losses.{name}")
        assert module.fp32_scope is fp32_scope, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        with fp32_scope(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        with fp32_scope("cpu"):
            assert not torch.is_autocast_enabled("cpu")

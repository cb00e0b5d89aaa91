"""FitNet hint regression and the feature connector (rdd_lightning.losses.fitnet, .connector)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdd_lightning.losses import FeatureConnector, hint_loss
from tests.test_kd import explicit_bilinear


def ref_mse(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = s.detach().double().flatten().tolist(), t.detach().double().flatten().tolist()
    return sum((a - b) ** 2 for a, b in zip(s, t, strict=True)) / len(t)


def test_connector_is_identity_for_equal_channels():
    connector = FeatureConnector(8, 8)
    assert connector.is_identity and not list(connector.parameters())
    x = torch.randn(2, 8, 3, 3)
    assert connector(x) is x


def test_connector_conv_bn_for_different_channels_and_on_request():
    connector = FeatureConnector(4, 6)
    conv, bn = connector.body
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 6
    assert connector(torch.randn(2, 4, 3, 3)).shape == (2, 6, 3, 3)
    forced = FeatureConnector(5, 5, always=True, norm=False)
    assert not forced.is_identity and len(forced.body) == 1 and isinstance(forced.body[0], nn.Conv2d)
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        connector(torch.randn(2, 5, 3, 3))


def test_hint_loss_matches_mse_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 3, 4, generator=g), torch.randn(2, 3, 3, 4, generator=g)
    loss = hint_loss(s, t)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_mse(s, t), rel=1e-6)
    assert hint_loss(t, t.clone()).item() == 0.0


def test_hint_loss_resizes_student_to_teacher():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    assert hint_loss(s, t).item() == pytest.approx(ref_mse(explicit_bilinear(s, 4, 5), t), rel=1e-5)


def test_hint_gradient_reaches_student_and_connector_not_teacher():
    fs = torch.randn(2, 4, 3, 3, requires_grad=True)
    ft = torch.randn(2, 6, 3, 3, requires_grad=True)
    connector = FeatureConnector(4, 6, always=True)
    hint_loss(connector(fs), ft).backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())


def test_hint_loss_needs_matching_channels():
    with pytest.raises(ValueError, match="FeatureConnector"):
        hint_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))


def test_hint_loss_float32_under_autocast():
    s, t = torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hint_loss(s.bfloat16(), t.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_mse(s.bfloat16(), t.bfloat16()), rel=1e-6)

"""Channel-wise distillation (rdd_lightning.losses.cwd) against a per-channel loop in float64."""

from __future__ import annotations

import math

import pytest
import torch

from rdd_lightning.losses import FeatureConnector, channel_wise_divergence
from tests.test_kd import explicit_bilinear


def ref_cwd(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    """T^2 / (B*C) * sum over channel maps of KL(softmax_pos(t/T) || softmax_pos(s/T)), explicit loops."""
    s, t = s.detach().double(), t.detach().double()
    B, C = t.shape[:2]
    total = 0.0
    for b in range(B):
        for c in range(C):
            xs = [float(v) / T for v in s[b, c].flatten()]
            xt = [float(v) / T for v in t[b, c].flatten()]
            zs = math.log(sum(math.exp(v) for v in xs))
            zt = math.log(sum(math.exp(v) for v in xt))
            for vs, vt in zip(xs, xt, strict=True):
                pt = math.exp(vt - zt)
                total += pt * ((vt - zt) - (vs - zs))
    return T * T * total / (B * C)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_cwd_matches_loop_reference(T):
    g = torch.Generator().manual_seed(0)
    s, t = 3 * torch.randn(2, 3, 3, 4, generator=g), 3 * torch.randn(2, 3, 3, 4, generator=g)
    loss = channel_wise_divergence(s, t, temperature=T)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_cwd(s, t, T), rel=1e-5)


def test_cwd_hand_value_one_channel():
    # two positions, teacher softmax [3/4, 1/4], student uniform, T = 1
    t = torch.tensor([math.log(3.0), 0.0]).view(1, 1, 1, 2)
    s = torch.zeros(1, 1, 1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert channel_wise_divergence(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_cwd_zero_for_identical_maps():
    x = 5 * torch.randn(2, 4, 3, 3)
    assert channel_wise_divergence(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_cwd_resizes_student_to_teacher():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    expected = ref_cwd(explicit_bilinear(s, 4, 5), t, 4.0)
    assert channel_wise_divergence(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_gradient_reaches_student_and_connector_not_teacher():
    g = torch.Generator().manual_seed(2)
    fs = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    ft = torch.randn(2, 6, 3, 3, generator=g, requires_grad=True)
    connector = FeatureConnector(4, 6)
    channel_wise_divergence(connector(fs), ft).backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())


def test_cwd_channel_mismatch_names_the_connector():
    with pytest.raises(ValueError, match="FeatureConnector"):
        channel_wise_divergence(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="temperature"):
        channel_wise_divergence(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), temperature=0.0)


def test_cwd_autocast_bf16_is_float32():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 3, 3, generator=g), torch.randn(2, 3, 3, 3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = channel_wise_divergence(s.bfloat16(), t.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_cwd(s.bfloat16().float(), t.bfloat16().float(), 4.0), rel=1e-5)

"""Channel-wise distillation (rdd_lightning.losses.cwd) against a per-channel loop in float64, and its
normaliser with a connector (the student's channel count, as the CIRKD code)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rdd_lightning.distillation import DistillationObjective
from rdd_lightning.losses import FeatureConnector, channel_wise_divergence
from rdd_lightning.models import SegOutput
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


def hand_cwd_through_conv(s: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, T: float) -> float:
    """The published CWD feature term written out: map the ``Cs``-channel student through the bias-free 1x1
    conv ``weight [Ct, Cs]`` pixel by pixel, sum the per-channel KL over all ``B * Ct`` maps, times ``T^2``,
    divided by ``B * Cs`` (the channel count of the student before the conv). Plain float loops."""
    s, weight, t = s.detach().double(), weight.detach().double(), t.detach().double()
    B, Cs, h, w = s.shape
    Ct = weight.shape[0]
    total = 0.0
    for b in range(B):
        for c in range(Ct):
            mapped = [
                sum(float(weight[c, k]) * float(s[b, k, i, j]) for k in range(Cs)) / T
                for i in range(h)
                for j in range(w)
            ]
            target = [float(v) / T for v in t[b, c].flatten()]
            zs = math.log(sum(math.exp(v) for v in mapped))
            zt = math.log(sum(math.exp(v) for v in target))
            total += sum(
                math.exp(vt - zt) * ((vt - zt) - (vs - zs)) for vs, vt in zip(mapped, target, strict=True)
            )
    return T * T * total / (B * Cs)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_cwd_with_connector_divides_by_the_student_channels(T):
    # 4 student channels mapped to 8 teacher channels: the KL over the 8 mapped maps is divided by 4 (CIRKD's
    # CriterionCWD reads its channel count before its connector), i.e. twice the mean over the 8 maps.
    g = torch.Generator().manual_seed(4)
    s, t = 2 * torch.randn(2, 4, 3, 2, generator=g), 2 * torch.randn(2, 8, 3, 2, generator=g)
    conv = nn.Conv2d(4, 8, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(8, 4, 1, 1, generator=g))
    loss = channel_wise_divergence(s, t, temperature=T, connector=conv)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    expected = hand_cwd_through_conv(s, conv.weight[:, :, 0, 0], t, T)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    mean_over_maps = ref_cwd(conv(s), t, T)  # the T^2 / (B * Ct) normaliser, e.g. mmrazor's after a connector
    assert loss.item() == pytest.approx(8 / 4 * mean_over_maps, rel=1e-5)


def test_cwd_identity_connector_is_the_mean_over_channel_maps():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 3, 3, generator=g), torch.randn(2, 3, 3, 3, generator=g)
    connector = FeatureConnector(3, 3)
    assert connector.is_identity
    loss = channel_wise_divergence(s, t, connector=connector)
    assert loss.item() == pytest.approx(ref_cwd(s, t, 4.0), rel=1e-5)


def test_objective_cwd_feature_uses_the_student_channel_normaliser():
    g = torch.Generator().manual_seed(6)
    objective = DistillationObjective(name="cwd", terms={"cwd_feature": {"weight": 1.0}})
    connector = FeatureConnector(4, 8).eval()  # BN on running statistics: a fixed map
    with torch.no_grad():
        connector.body[0].weight.copy_(torch.randn(8, 4, 1, 1, generator=g))
    fs, ft = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 8, 3, 3, generator=g)
    logits = torch.randn(2, 3, 3, 3, generator=g)
    student = SegOutput(logits=logits, aux_logits=None, features=[fs], decoder_features=fs)
    teacher = SegOutput(logits=logits, aux_logits=None, features=[ft], decoder_features=ft)
    target = torch.zeros(2, 3, 3, dtype=torch.long)
    out = objective(student, teacher, target, nn.ModuleDict({"cwd_feature": connector}))
    expected = 8 / 4 * ref_cwd(connector(fs), ft, 4.0)
    assert out["loss_cwd_feature"].item() == pytest.approx(expected, rel=1e-5)


def test_cwd_gradient_reaches_student_and_connector_not_teacher():
    g = torch.Generator().manual_seed(2)
    fs = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    ft = torch.randn(2, 6, 3, 3, generator=g, requires_grad=True)
    connector = FeatureConnector(4, 6)
    channel_wise_divergence(fs, ft, connector=connector).backward()
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

"""DIST (rdd_lightning.losses.dist) against Pearson correlations written out in float64 loops."""

from __future__ import annotations

import math

import pytest
import torch

from rdd_lightning.losses import dist_loss
from rdd_lightning.losses.dist import pearson_correlation
from tests.test_kd import explicit_bilinear


def ref_softmax_rows(z: torch.Tensor, T: float) -> list[list[float]]:
    """[B, C, h, w] logits -> list of N = B*h*w rows of C probabilities (float64 math)."""
    z = z.detach().double()
    B, C, h, w = z.shape
    rows = []
    for b in range(B):
        for i in range(h):
            for j in range(w):
                x = [float(z[b, c, i, j]) / T for c in range(C)]
                m = max(x)
                e = [math.exp(v - m) for v in x]
                rows.append([v / sum(e) for v in e])
    return rows


def ref_pearson(u: list[float], v: list[float]) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [a - mu for a in u], [b - mv for b in v]
    num = sum(a * b for a, b in zip(du, dv, strict=True))
    return num / (math.sqrt(sum(a * a for a in du)) * math.sqrt(sum(b * b for b in dv)) + 1e-8)


def ref_dist(zs, zt, beta=1.0, gamma=1.0, T=1.0) -> float:
    ps, pt = ref_softmax_rows(zs, T), ref_softmax_rows(zt, T)
    inter = 1 - sum(ref_pearson(a, b) for a, b in zip(ps, pt, strict=True)) / len(ps)
    C = len(ps[0])
    intra = 1 - sum(ref_pearson([r[c] for r in ps], [r[c] for r in pt]) for c in range(C)) / C
    return T * T * (beta * inter + gamma * intra)


def test_pearson_helper():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 1.0]])
    y = torch.tensor([[2.0, 4.0, 6.1], [-1.0, 0.0, -1.0]])
    r = pearson_correlation(x, y, dim=1)
    assert r[0].item() == pytest.approx(ref_pearson([1, 2, 3], [2, 4, 6.1]), rel=1e-6)
    assert r[1].item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize(("beta", "gamma", "T"), [(1.0, 1.0, 1.0), (0.5, 2.0, 1.0), (1.0, 1.0, 4.0)])
def test_dist_matches_loop_reference(beta, gamma, T):
    g = torch.Generator().manual_seed(0)
    zs, zt = 2 * torch.randn(2, 4, 3, 3, generator=g), 3 * torch.randn(2, 4, 3, 3, generator=g)
    loss = dist_loss(zs, zt, beta=beta, gamma=gamma, temperature=T)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_dist(zs, zt, beta, gamma, T), rel=1e-5)


def test_dist_zero_for_identical_logits_and_bounded():
    z = 3 * torch.randn(2, 5, 3, 4)
    assert dist_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-5)
    worst = dist_loss(z, -z)
    assert 0 < worst.item() <= 4.0


def test_dist_resizes_student_to_teacher():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    expected = ref_dist(explicit_bilinear(zs, 4, 5), zt)
    assert dist_loss(zs, zt).item() == pytest.approx(expected, rel=1e-5)


def test_dist_gradient_only_to_student():
    zs = torch.randn(2, 3, 3, 3, requires_grad=True)
    zt = torch.randn(2, 3, 3, 3, requires_grad=True)
    dist_loss(zs, zt).backward()
    assert zt.grad is None
    assert zs.grad is not None and zs.grad.abs().sum() > 0


def test_dist_bad_inputs_and_autocast():
    with pytest.raises(ValueError, match="channels"):
        dist_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="temperature"):
        dist_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), temperature=-1.0)
    zs, zt = torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dist_loss(zs.bfloat16(), zt.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_dist(zs.bfloat16(), zt.bfloat16()), rel=1e-5)

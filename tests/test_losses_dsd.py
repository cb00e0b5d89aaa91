"""Double similarity distillation (rdd_lightning.losses.dsd) against explicit loops in float64."""

from __future__ import annotations

import math

import pytest
import torch

from rdd_lightning.losses import category_similarity_loss, pixel_similarity_loss
from rdd_lightning.losses.dsd import category_similarity
from tests.test_kd import explicit_bilinear


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / max(n, 1e-12) for x in v]


def ref_attention_vectors(features, h, w) -> list[list[list[float]]]:
    """Per layer, per image: the normalised attention vector (channel mean of squares) at (h, w)."""
    layers = []
    for f in features:
        f = f.detach().double()
        a = (f**2).sum(dim=1, keepdim=True) / f.shape[1]
        if a.shape[-2:] != (h, w):
            a = explicit_bilinear(a, h, w)
        layers.append([unit(a[b].flatten().tolist()) for b in range(a.shape[0])])
    return layers


def ref_psd(fs_list, ft_list) -> float:
    h, w = ft_list[0].shape[-2:]
    a_s, a_t = ref_attention_vectors(fs_list, h, w), ref_attention_vectors(ft_list, h, w)
    L, B = len(a_s), len(a_s[0])
    pair_losses = []
    for n in range(L - 1):
        for m in range(n + 1, L):
            total = 0.0
            for b in range(B):
                rs = unit([x - y for x, y in zip(a_s[m][b], a_s[n][b], strict=True)])
                rt = unit([x - y for x, y in zip(a_t[m][b], a_t[n][b], strict=True)])
                total += sum((x - y) ** 2 for x, y in zip(rs, rt, strict=True))
            pair_losses.append(total / (B * h * w))
    return sum(pair_losses) / len(pair_losses)


def ref_category(z: torch.Tensor, tau: float, k: int) -> torch.Tensor:
    """[B, C, C] float64: average-pool (k x k, last windows clipped), spatial softmax, Gram matrix."""
    z = z.detach().double()
    B, C, h, w = z.shape
    out = torch.empty(B, C, C, dtype=torch.float64)
    for b in range(B):
        rows = []
        for c in range(C):
            pooled = []
            for i0 in range(0, h, k):
                for j0 in range(0, w, k):
                    window = z[b, c, i0 : min(i0 + k, h), j0 : min(j0 + k, w)].flatten().tolist()
                    pooled.append(sum(window) / len(window) / tau)
            m = max(pooled)
            e = [math.exp(v - m) for v in pooled]
            rows.append([v / sum(e) for v in e])
        for c1 in range(C):
            for c2 in range(C):
                out[b, c1, c2] = sum(x * y for x, y in zip(rows[c1], rows[c2], strict=True))
    return out


def test_psd_matches_loop_reference_three_layers_mixed_channels():
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(2, c, 3, 4, generator=g) for c in (3, 5, 3)]
    ft = [torch.randn(2, c, 3, 4, generator=g) for c in (3, 8, 3)]
    loss = pixel_similarity_loss(fs, ft)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_psd(fs, ft), rel=1e-5)


def test_psd_resizes_to_the_teachers_first_layer():
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 4, 4, 6, generator=g)]
    ft = [torch.randn(2, 3, 4, 6, generator=g), torch.randn(2, 6, 2, 3, generator=g)]
    assert pixel_similarity_loss(fs, ft).item() == pytest.approx(ref_psd(fs, ft), rel=1e-5)


def test_psd_zero_for_identical_layers_and_gradient_only_to_student():
    f = [torch.randn(2, 3, 3, 3), torch.randn(2, 4, 3, 3)]
    assert pixel_similarity_loss(f, [x.clone() for x in f]).item() == pytest.approx(0.0, abs=1e-7)
    fs = [torch.randn(2, 3, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)]
    ft = [torch.randn(2, 3, 3, 3, requires_grad=True), torch.randn(2, 5, 3, 3, requires_grad=True)]
    pixel_similarity_loss(fs, ft).backward()
    assert all(t.grad is None for t in ft)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in fs)


def test_psd_bad_layer_lists():
    with pytest.raises(ValueError, match="at least 2 layers"):
        pixel_similarity_loss([torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 2, 2, 2)])
    with pytest.raises(ValueError, match="same number of layers"):
        pixel_similarity_loss([torch.zeros(1, 2, 2, 2)] * 2, [torch.zeros(1, 2, 2, 2)] * 3)


@pytest.mark.parametrize(("h", "w", "k"), [(4, 4, 2), (5, 3, 2), (3, 3, 1)])
def test_category_similarity_matches_loop_reference(h, w, k):
    g = torch.Generator().manual_seed(h * w)
    z = 3 * torch.randn(2, 3, h, w, generator=g)
    got = category_similarity(z, temperature=4.0, pool_size=k)
    assert got.shape == (2, 3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_category(z, 4.0, k), atol=1e-6, rtol=1e-5)


def test_csd_loss_matches_reference_and_resizes():
    g = torch.Generator().manual_seed(2)
    # large logits: the T = 4 softmaxes are far from uniform, so the float32 matrices differ clearly
    zs, zt = 8 * torch.randn(2, 3, 4, 5, generator=g), 8 * torch.randn(2, 3, 4, 5, generator=g)
    expected = float(((ref_category(zs, 4.0, 2) - ref_category(zt, 4.0, 2)) ** 2).mean())
    assert category_similarity_loss(zs, zt).item() == pytest.approx(expected, rel=1e-5)
    small = 8 * torch.randn(2, 3, 2, 3, generator=g)
    up = explicit_bilinear(small, 4, 5)
    expected = float(((ref_category(up, 4.0, 2) - ref_category(zt, 4.0, 2)) ** 2).mean())
    assert category_similarity_loss(small, zt).item() == pytest.approx(expected, rel=1e-5)


def test_csd_zero_for_identical_logits_and_gradient_only_to_student():
    z = torch.randn(2, 4, 4, 4)
    assert category_similarity_loss(z, z.clone()).item() == 0.0
    zs = torch.randn(2, 4, 4, 4, requires_grad=True)
    zt = torch.randn(2, 4, 4, 4, requires_grad=True)
    category_similarity_loss(zs, zt).backward()
    assert zt.grad is None and zs.grad is not None and zs.grad.abs().sum() > 0


def test_dsd_float32_under_autocast():
    f = [torch.randn(2, 3, 3, 3).bfloat16(), torch.randn(2, 3, 3, 3).bfloat16()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        psd = pixel_similarity_loss(f, [torch.randn(2, 3, 3, 3).bfloat16()] * 2)
        csd = category_similarity_loss(f[0], f[1])
    assert psd.dtype == torch.float32 and csd.dtype == torch.float32

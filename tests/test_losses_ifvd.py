"""Intra-class feature variation distillation (rdd_lightning.losses.ifvd) against per-class loops."""

from __future__ import annotations

import math

import pytest
import torch

from rdd_lightning.losses import class_prototype_similarity, ifv_loss
from tests.test_kd import explicit_bilinear

IGNORE = 255


def ref_nearest(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest sampling of [B, H, W] labels to (h, w): source index floor(i * H / h)."""
    B, H, W = y.shape
    out = torch.empty(B, h, w, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = y[:, min(math.floor(i * H / h), H - 1), min(math.floor(j * W / w), W - 1)]
    return out


def ref_similarity(f: torch.Tensor, y: torch.Tensor, K: int) -> torch.Tensor:
    """[B, h, w] float64 cosine to the per-image class prototype; 1 at void pixels."""
    f = f.detach().double()
    B, C, h, w = f.shape
    out = torch.ones(B, h, w, dtype=torch.float64)
    for b in range(B):
        protos = {}
        for k in range(K):
            members = [(i, j) for i in range(h) for j in range(w) if int(y[b, i, j]) == k]
            if members:
                total = [sum(float(f[b, c, i, j]) for i, j in members) for c in range(C)]
                protos[k] = [v / (len(members) + 1e-6) for v in total]
        for i in range(h):
            for j in range(w):
                k = int(y[b, i, j])
                if k in protos:
                    v = [float(f[b, c, i, j]) for c in range(C)]
                    p = protos[k]
                    dot = sum(a * q for a, q in zip(v, p, strict=True))
                    out[b, i, j] = dot / (math.sqrt(sum(a * a for a in v)) * math.sqrt(sum(q * q for q in p)))
    return out


def ref_ifv(fs, ft, y, K) -> float:
    ht, wt = ft.shape[-2:]
    m_t = ref_similarity(ft, ref_nearest(y, ht, wt), K)
    m_s = ref_similarity(fs, ref_nearest(y, *fs.shape[-2:]), K)
    if m_s.shape[-2:] != (ht, wt):
        m_s = explicit_bilinear(m_s[:, None], ht, wt)[:, 0]
    return float(((m_s - m_t) ** 2).mean())


def labels(seed: int, B: int, H: int, W: int, K: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (B, H, W), generator=g)
    y[torch.rand(B, H, W, generator=g) < 0.2] = IGNORE
    return y


def test_prototype_similarity_hand_case():
    # one image, class 0 at two pixels with orthogonal features, class 1 at one pixel, one void pixel
    f = torch.tensor([[[[1.0, 0.0], [3.0, 5.0]], [[0.0, 1.0], [4.0, -2.0]]]])  # [1, 2, 2, 2]
    y = torch.tensor([[[0, 0], [1, IGNORE]]])
    m = class_prototype_similarity(f, y, num_classes=2)
    assert m.shape == (1, 2, 2) and m.dtype == torch.float32
    assert m[0, 0, 0].item() == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    assert m[0, 0, 1].item() == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    assert m[0, 1, 0].item() == pytest.approx(1.0, abs=1e-6)  # the only member: its own prototype
    assert m[0, 1, 1].item() == pytest.approx(1.0, abs=1e-6)  # void


def test_prototype_similarity_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 4, 3, 5, generator=g)
    y = labels(1, 2, 3, 5, 3)
    y[0, 0, 0] = 7  # a label outside [0, K) is void too
    torch.testing.assert_close(
        class_prototype_similarity(f, y, 3).double(), ref_similarity(f, y, 3), atol=1e-6, rtol=0
    )


def test_ifv_matches_reference_with_label_sampling_and_different_channels():
    g = torch.Generator().manual_seed(2)
    fs, ft = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 6, 4, 5, generator=g)
    y = labels(3, 2, 16, 20, 3)
    loss = ifv_loss(fs, ft, y, num_classes=3)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_ifv(fs, ft, y, 3), rel=1e-5)


def test_ifv_different_resolutions():
    g = torch.Generator().manual_seed(4)
    fs, ft = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 5, 4, 6, generator=g)
    y = labels(5, 2, 8, 12, 3)
    assert ifv_loss(fs, ft, y, 3).item() == pytest.approx(ref_ifv(fs, ft, y, 3), rel=1e-5)


def test_ifv_zero_for_identical_features_and_all_void():
    f = torch.randn(2, 4, 3, 3)
    y = labels(6, 2, 6, 6, 3)
    assert ifv_loss(f, f.clone(), y, 3).item() == pytest.approx(0.0, abs=1e-7)
    void = torch.full((2, 6, 6), IGNORE)
    assert ifv_loss(torch.randn(2, 4, 3, 3), f, void, 3).item() == pytest.approx(0.0, abs=1e-7)


def test_ifv_gradient_only_to_student():
    fs = torch.randn(2, 3, 3, 3, requires_grad=True)
    ft = torch.randn(2, 4, 3, 3, requires_grad=True)
    ifv_loss(fs, ft, labels(7, 2, 6, 6, 3), 3).backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0


def test_ifv_bad_inputs_and_autocast():
    with pytest.raises(ValueError, match="batch size"):
        ifv_loss(torch.zeros(1, 2, 2, 2), torch.zeros(2, 2, 2, 2), torch.zeros(2, 4, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="integer labels"):
        ifv_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.zeros(1, 4, 4), 2)
    fs, ft, y = torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3), labels(8, 2, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ifv_loss(fs.bfloat16(), ft.bfloat16(), y, 3)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_ifv(fs.bfloat16(), ft.bfloat16(), y, 3), rel=1e-4, abs=1e-7)

"""Tests of the RDD math (rdd_lightning.rdd) against hand-computed values and independent references.

References here never call the code under test: bilinear resizing is an explicit per-pixel loop, softmax and
KL are computed in float64, the OHEM threshold uses a full sort, and the losses are per-pixel Python loops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdd_lightning import rdd

IGNORE = 255
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------- independent references
def ref_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True, as an explicit per-pixel loop, float64. x: [B, C, h, w]."""
    x = x.detach().double()
    B, C, h, w = x.shape
    H, W = size
    out = torch.empty(B, C, H, W, dtype=torch.float64)
    for i in range(H):
        sy = i * (h - 1) / (H - 1) if H > 1 else 0.0
        y0 = min(int(math.floor(sy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for j in range(W):
            sx = j * (w - 1) / (W - 1) if W > 1 else 0.0
            x0 = min(int(math.floor(sx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            top = (1 - fx) * x[:, :, y0, x0] + fx * x[:, :, y0, x1]
            bottom = (1 - fx) * x[:, :, y1, x0] + fx * x[:, :, y1, x1]
            out[:, :, i, j] = (1 - fy) * top + fy * bottom
    return out


def ref_probs(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """softmax(up(logits)) in float64, [B, C, H, W]."""
    return torch.softmax(ref_up(logits, size), dim=1)


def ref_confidence(probs: torch.Tensor, y: torch.Tensor, kind: str = "gt_prob") -> torch.Tensor:
    """q per pixel (loop), 1 at ignored pixels. probs [B, C, H, W] float64."""
    B, _, H, W = probs.shape
    q = torch.ones(B, H, W, dtype=torch.float64)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                c = int(y[b, i, j])
                if c != IGNORE:
                    q[b, i, j] = probs[b, c, i, j] if kind == "gt_prob" else probs[b, :, i, j].max()
    return q


def ref_threshold(q: torch.Tensor, valid: torch.Tensor, threshold: float, min_kept: int) -> float:
    """tau by a full sort: max(threshold, k-th smallest q with q=1 at ignored), k = min(min_kept, #valid)."""
    q = torch.where(valid, q, torch.ones_like(q))
    k = min(min_kept, int(valid.sum()))
    if k <= 0:
        return threshold
    kth = torch.sort(q.flatten()).values[k - 1].item()
    return max(threshold, kth)


def ref_hard(q: torch.Tensor, valid: torch.Tensor, threshold: float, min_kept: int) -> torch.Tensor:
    tau = ref_threshold(q, valid, threshold, min_kept)
    return valid & (q <= tau)


def ref_combine(a: torch.Tensor, b: torch.Tensor | None, mode: str) -> torch.Tensor:
    table = {
        "xor": lambda s, t: s != t,
        "or": lambda s, t: s or t,
        "and": lambda s, t: s and t,
        "student": lambda s, t: s,
    }
    out = torch.zeros_like(a)
    for idx in range(a.numel()):
        s = bool(a.flatten()[idx])
        t = bool(b.flatten()[idx]) if b is not None else False
        out.view(-1)[idx] = table[mode](s, t)
    return out


def ref_wce(probs, y, mask, class_weight, normalize) -> float:
    """Per-pixel loop of the (class-weighted) CE over the selected pixels."""
    B, _, H, W = probs.shape
    num = den = 0.0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                if mask[b, i, j]:
                    c = int(y[b, i, j])
                    wc = 1.0 if class_weight is None else float(class_weight[c])
                    num += wc * -math.log(float(probs[b, c, i, j]))
                    den += wc
    if normalize == "all_pixels":
        return num / (B * H * W)
    return num / den if den > 0 else 0.0


def ref_tse(
    zs,
    as_,
    zt,
    at,
    y,
    *,
    mode="xor",
    threshold=0.7,
    min_kept=100000,
    class_weight=None,
    normalize="selected",
    confidence="gt_prob",
    aux_weight=0.4,
) -> float:
    size = tuple(y.shape[-2:])
    valid = y != IGNORE

    def hard(z):
        return ref_hard(ref_confidence(ref_probs(z, size), y, confidence), valid, threshold, min_kept)

    ps = ref_probs(zs, size)
    hard_t = None if mode == "student" else hard(zt)
    loss = ref_wce(ps, y, ref_combine(hard(zs), hard_t, mode), class_weight, normalize)
    if as_ is not None:
        hard_ta = None if mode == "student" else (hard(at) if at is not None else hard_t)
        pa = ref_probs(as_, size)
        loss += aux_weight * ref_wce(pa, y, ref_combine(hard(as_), hard_ta, mode), class_weight, normalize)
    return loss


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over dim 1, explicit sum, float64."""
    return (p * (p.log() - q.log())).sum(dim=1)


def ref_tfe_weight(zt, at, size, direction="aux_to_main"):
    pm = torch.softmax(zt.double(), 1)
    pa = torch.softmax(at.double(), 1)
    u = ref_kl(pa, pm) if direction == "aux_to_main" else ref_kl(pm, pa)
    return ref_up(torch.exp(-u).unsqueeze(1), size).squeeze(1)


def ref_tfe(zs, as_, zt, at, y, direction="aux_to_main", aux_weight=0.4) -> float:
    size = tuple(y.shape[-2:])
    wgt = ref_tfe_weight(zt, at, size, direction)
    ps = ref_probs(zs, size)
    pa = ref_probs(as_, size) if as_ is not None else None
    B, H, W = y.shape
    total = 0.0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                c = int(y[b, i, j])
                if c == IGNORE:
                    continue
                ce = -math.log(float(ps[b, c, i, j]))
                if pa is not None:
                    ce += aux_weight * -math.log(float(pa[b, c, i, j]))
                total += float(wgt[b, i, j]) * ce
    return total / (B * H * W)


# ------------------------------------------------------------------------------------------ fixtures
def two_class_logits(q: list[list[float]], labels: list[list[int]]) -> torch.Tensor:
    """[1, 2, H, W] logits whose softmax gives probability q to the labelled class (class 0 for ignored)."""
    qt = torch.tensor(q, dtype=torch.float64)
    yt = torch.tensor(labels)
    is_one = yt == 1
    p1 = torch.where(is_one, qt, 1 - qt)
    return torch.stack([(1 - p1).log(), p1.log()]).unsqueeze(0).float()


def random_case(seed: int, *, B=2, C=3, h=3, w=4, H=5, W=7, ignore_frac=0.2, aux=True):
    g = torch.Generator().manual_seed(seed)

    def logits(scale=2.0):
        return (scale * torch.randn(B, C, h, w, generator=g)).requires_grad_(True)

    y = torch.randint(0, C, (B, H, W), generator=g)
    y[torch.rand(B, H, W, generator=g) < ignore_frac] = IGNORE
    return {
        "zs": logits(),
        "as_": logits() if aux else None,
        "zt": logits(3.0).detach(),
        "at": logits(3.0).detach() if aux else None,
        "y": y,
    }


# ----------------------------------------------------------------------------------------- public surface
def test_public_surface_is_the_contract_plus_what_callers_use():
    contract = {"tfe_weight", "tfe_task_loss", "hard_pixel_mask", "tse_task_loss"}
    assert contract <= set(rdd.__all__)
    assert all(hasattr(rdd, name) for name in rdd.__all__)
    for private in ("fp32_scope", "pixel_cross_entropy", "selected_cross_entropy", "head_disagreement"):
        assert private not in rdd.__all__ and not hasattr(rdd, private)


# ------------------------------------------------------------------------------------------ upsampling
def test_upsample_matches_explicit_bilinear_loop():
    x = torch.randn(2, 3, 3, 4)
    out = rdd.upsample_logits(x, (5, 7))
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_up(x, (5, 7)), atol=1e-6, rtol=0)


def test_upsample_same_size_is_identity_and_float32():
    x = torch.randn(1, 2, 3, 3, dtype=torch.bfloat16)
    out = rdd.upsample_logits(x, (3, 3))
    assert out.dtype == torch.float32
    assert torch.equal(out, x.float())


# ------------------------------------------------------------------------------------------------ TFE
# Heads on one logit pixel: main softmax [1/2, 1/2], aux softmax [3/4, 1/4].
#   KL(aux || main) = 3/4 ln(3/2) + 1/4 ln(1/2)     -> w = (3/2)^(-3/4) * 2^(1/4)
#   KL(main || aux) = 1/2 ln(2/3) + 1/2 ln 2        -> w = sqrt(3)/2
MAIN_1PX = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)
AUX_1PX = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)


@pytest.mark.parametrize(
    "direction, expected",
    [("aux_to_main", 1.5**-0.75 * 2**0.25), ("main_to_aux", math.sqrt(3) / 2)],
)
def test_tfe_weight_hand_computed(direction, expected):
    w = rdd.tfe_weight(MAIN_1PX, AUX_1PX, (2, 3), kl_direction=direction)
    assert w.shape == (1, 2, 3) and w.dtype == torch.float32
    torch.testing.assert_close(w, torch.full((1, 2, 3), expected), atol=1e-6, rtol=0)


def test_tfe_weight_default_direction_is_aux_to_main():
    w = rdd.tfe_weight(MAIN_1PX, AUX_1PX, (1, 1))
    assert w.item() == pytest.approx(1.5**-0.75 * 2**0.25, abs=1e-6)


def test_tfe_weight_identical_heads_is_one():
    z = torch.randn(2, 4, 3, 5) * 5
    w = rdd.tfe_weight(z, z.clone(), (6, 9))
    torch.testing.assert_close(w, torch.ones(2, 6, 9), atol=1e-6, rtol=0)


def test_tfe_weight_is_upsampled_bilinearly_to_label_size():
    # two logit pixels with known weights -> label row of 3: [w0, (w0+w1)/2, w1] (align_corners=True)
    main = torch.zeros(1, 2, 1, 2)
    aux = torch.zeros(1, 2, 1, 2)
    aux[0, 0, 0, 1] = math.log(3.0)  # pixel 1 heads disagree as in the hand case; pixel 0 agrees (w = 1)
    w1 = 1.5**-0.75 * 2**0.25
    w = rdd.tfe_weight(main, aux, (1, 3))
    torch.testing.assert_close(w, torch.tensor([[[1.0, (1 + w1) / 2, w1]]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", ["aux_to_main", "main_to_aux"])
def test_tfe_weight_matches_reference(direction):
    g = torch.Generator().manual_seed(3)
    zt, at = 3 * torch.randn(2, 4, 3, 4, generator=g), 3 * torch.randn(2, 4, 3, 4, generator=g)
    w = rdd.tfe_weight(zt, at, (5, 7), kl_direction=direction)
    torch.testing.assert_close(w.double(), ref_tfe_weight(zt, at, (5, 7), direction), atol=1e-5, rtol=1e-5)


def test_tfe_weight_resizes_aux_to_main_resolution():
    zt = torch.randn(1, 3, 3, 3)
    at_small = torch.randn(1, 3, 2, 2)
    at_big = F.interpolate(at_small, size=(3, 3), mode="bilinear", align_corners=True)
    torch.testing.assert_close(rdd.tfe_weight(zt, at_small, (4, 4)), rdd.tfe_weight(zt, at_big, (4, 4)))


def test_tfe_loss_hand_computed_with_ignore_in_denominator():
    # 1x2 labels: pixel 0 class 0, pixel 1 ignored; student logits at label resolution; teacher 1 pixel.
    zs = torch.tensor([[[[math.log(0.8), 0.0]], [[math.log(0.2), 0.0]]]])  # p(class 0) = 0.8 at pixel 0
    y = torch.tensor([[[0, IGNORE]]])
    w = math.sqrt(3) / 2
    loss = rdd.tfe_task_loss(zs, None, MAIN_1PX, AUX_1PX, y, kl_direction="main_to_aux")
    assert loss.item() == pytest.approx(w * -math.log(0.8) / 2, rel=1e-6)  # denominator B*H*W = 2
    # with a student aux head (p = 0.5 everywhere): + 0.4 * ln 2, still / 2
    as_ = torch.zeros(1, 2, 1, 2)
    loss = rdd.tfe_task_loss(zs, as_, MAIN_1PX, AUX_1PX, y, kl_direction="main_to_aux")
    assert loss.item() == pytest.approx(w * (-math.log(0.8) + 0.4 * math.log(2)) / 2, rel=1e-6)


@pytest.mark.parametrize("aux", [True, False])
@pytest.mark.parametrize("direction", ["aux_to_main", "main_to_aux"])
def test_tfe_loss_matches_per_pixel_reference(aux, direction):
    c = random_case(11, aux=True)
    as_ = c["as_"] if aux else None
    loss = rdd.tfe_task_loss(c["zs"], as_, c["zt"], c["at"], c["y"], kl_direction=direction)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_tfe(c["zs"], as_, c["zt"], c["at"], c["y"], direction), rel=1e-5)


def test_tfe_needs_teacher_aux_head():
    c = random_case(0)
    with pytest.raises(ValueError, match=r"teacher\.aux_head"):
        rdd.tfe_task_loss(c["zs"], c["as_"], c["zt"], None, c["y"])
    with pytest.raises(ValueError, match="auxiliary head"):
        rdd.tfe_weight(c["zt"], None, (5, 7))


def test_tfe_stats_weight_mean_over_valid_pixels():
    c = random_case(5)
    loss, stats = rdd.tfe_task_loss(c["zs"], c["as_"], c["zt"], c["at"], c["y"], return_stats=True)
    assert set(stats) == {"tfe_weight_mean"}
    wref = ref_tfe_weight(c["zt"], c["at"], (5, 7))
    valid = c["y"] != IGNORE
    assert stats["tfe_weight_mean"].item() == pytest.approx(wref[valid].mean().item(), rel=1e-5)
    assert not stats["tfe_weight_mean"].requires_grad
    assert torch.equal(loss, rdd.tfe_task_loss(c["zs"], c["as_"], c["zt"], c["at"], c["y"]))


# ------------------------------------------------------------------------------------ hard-pixel mask
Q = [[0.9, 0.6], [0.3, 0.8]]
LABELS = [[0, 1], [1, 0]]


@pytest.mark.parametrize(
    "min_kept, expected",
    [
        (0, [[False, True], [True, False]]),  # no minimum: tau = 0.7
        (1, [[False, True], [True, False]]),  # 2 pixels <= 0.7 >= k = 1: fixed-threshold path
        (2, [[False, True], [True, False]]),
        (3, [[False, True], [True, True]]),  # only 2 <= 0.7 < k = 3: tau = 3rd smallest = 0.8
        (10, [[True, True], [True, True]]),  # k = #valid = 4: every valid pixel
    ],
)
def test_hard_pixel_mask_threshold_paths(min_kept, expected):
    logits = two_class_logits(Q, LABELS)
    y = torch.tensor([LABELS])
    mask = rdd.hard_pixel_mask(logits, y, threshold=0.7, min_kept=min_kept)
    assert mask.dtype == torch.bool and mask.shape == (1, 2, 2)
    assert mask.tolist() == [expected]


def test_hard_pixel_threshold_values():
    q = torch.tensor([[[0.9, 0.6], [0.3, 0.8]]])
    valid = torch.ones_like(q, dtype=torch.bool)
    assert rdd.hard_pixel_threshold(q, valid, threshold=0.7, min_kept=2).item() == pytest.approx(0.7)
    assert rdd.hard_pixel_threshold(q, valid, threshold=0.7, min_kept=3).item() == pytest.approx(0.8)
    assert rdd.hard_pixel_threshold(q, valid, threshold=0.7, min_kept=4).item() == pytest.approx(0.9)


def test_hard_mask_boundaries_are_inclusive_and_never_select_void():
    q = torch.tensor([0.7, 0.70000005, 0.5, 1.0])  # float32: the first equals float32(0.7)
    valid = torch.ones(4, dtype=torch.bool)
    assert rdd.hard_mask_from_confidence(q, valid, threshold=0.7, min_kept=0).tolist() == [
        True,
        False,
        True,
        False,
    ]
    # k-th value equal to q of another pixel: both are hard (q <= tau)
    q = torch.tensor([0.9, 0.8, 0.8, 0.95])
    assert rdd.hard_mask_from_confidence(q, valid, threshold=0.7, min_kept=2).tolist() == [
        False,
        True,
        True,
        False,
    ]
    # tau reaches 1 (k = #valid and a valid pixel has q = 1): the void pixel (q = 1 by contract) stays out
    q = torch.tensor([1.0, 1.0, 0.5, 1.0])
    valid = torch.tensor([True, True, True, False])
    assert rdd.hard_mask_from_confidence(q, valid, threshold=0.7, min_kept=10).tolist() == [
        True,
        True,
        True,
        False,
    ]


def test_hard_pixel_mask_ignores_void_pixels():
    labels = [[0, 1], [IGNORE, 0]]  # the 0.3 pixel is void
    logits = two_class_logits(Q, [[0, 1], [0, 0]])
    y = torch.tensor([labels])
    assert rdd.hard_pixel_mask(logits, y, min_kept=1).tolist() == [[[False, True], [False, False]]]
    # k = 2 > #(valid q <= 0.7) = 1: tau = 2nd smallest valid q = 0.8; the void pixel never counts
    assert rdd.hard_pixel_mask(logits, y, min_kept=2).tolist() == [[[False, True], [False, True]]]
    # k capped at #valid = 3: all valid pixels, still not the void one
    assert rdd.hard_pixel_mask(logits, y, min_kept=100).tolist() == [[[True, True], [False, True]]]
    # threshold >= 1 must not select void pixels either
    assert rdd.hard_pixel_mask(logits, y, threshold=1.0, min_kept=0).tolist() == [
        [[True, True], [False, True]]
    ]


def test_hard_pixel_mask_all_ignored_is_empty():
    y = torch.full((2, 3, 3), IGNORE)
    for min_kept in (0, 5):
        for threshold in (0.7, 1.0):
            mask = rdd.hard_pixel_mask(torch.randn(2, 3, 2, 2), y, threshold=threshold, min_kept=min_kept)
            assert not mask.any()


def test_hard_pixel_mask_max_prob_confidence():
    # 3 classes; pixel probabilities chosen so gt_prob and max_prob disagree about hardness
    probs = torch.tensor(
        [[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.1, 0.85, 0.05], [0.3, 0.3, 0.4]], dtype=torch.float64
    )  # pixels in row-major order of a 2x2 map
    logits = probs.log().T.reshape(1, 3, 2, 2).float()
    y = torch.tensor([[[1, 0], [1, 2]]])  # gt probs 0.1, 0.5, 0.85, 0.4; max probs 0.8, 0.5, 0.85, 0.4
    gt = rdd.hard_pixel_mask(logits, y, min_kept=0, confidence="gt_prob")
    mx = rdd.hard_pixel_mask(logits, y, min_kept=0, confidence="max_prob")
    assert gt.tolist() == [[[True, True], [False, True]]]
    assert mx.tolist() == [[[False, True], [False, True]]]


@pytest.mark.parametrize("confidence", ["gt_prob", "max_prob"])
@pytest.mark.parametrize("min_kept", [0, 10, 40, 1000])
def test_hard_pixel_mask_upsampled_matches_reference(confidence, min_kept):
    c = random_case(7)
    valid = c["y"] != IGNORE
    for z in (c["zs"], c["zt"]):
        q_ref = ref_confidence(ref_probs(z, (5, 7)), c["y"], confidence)
        expected = ref_hard(q_ref, valid, 0.7, min_kept)
        got = rdd.hard_pixel_mask(z, c["y"], threshold=0.7, min_kept=min_kept, confidence=confidence)
        assert torch.equal(got, expected)


def test_pixel_confidence_matches_softmax_and_extreme_logit_fallback():
    c = random_case(8)
    q = rdd.pixel_confidence(c["zt"], c["y"])
    torch.testing.assert_close(
        q.double(), ref_confidence(ref_probs(c["zt"], (5, 7)), c["y"]), atol=1e-6, rtol=0
    )
    # logit ranges of ~300 nats between neighbouring pixels underflow the fast path; the fallback is exact
    z = torch.zeros(1, 2, 1, 2)
    z[0, 0, 0, 0], z[0, 1, 0, 1] = 300.0, 300.0
    y = torch.tensor([[[0, 0, 1]]])
    q = rdd.pixel_confidence(z, y)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), ref_confidence(ref_probs(z, (1, 3)), y), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ mask modes
def test_combine_hard_masks_modes():
    s = torch.tensor([True, True, False, False])
    t = torch.tensor([True, False, True, False])
    assert rdd.combine_hard_masks(s, t, "xor").tolist() == [False, True, True, False]
    assert rdd.combine_hard_masks(s, t, "or").tolist() == [True, True, True, False]
    assert rdd.combine_hard_masks(s, t, "and").tolist() == [True, False, False, False]
    assert rdd.combine_hard_masks(s, t, "student").tolist() == [True, True, False, False]
    assert rdd.combine_hard_masks(s, None, "student").tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="teacher"):
        rdd.combine_hard_masks(s, None, "xor")


# ------------------------------------------------------------------------------------------------ TSE
# Student q = [[0.9, 0.6], [0.3, 0.8]] -> hard (tau = 0.7) [[F, T], [T, F]]
# Teacher q = [[0.5, 0.95], [0.2, 0.9]] -> hard             [[T, F], [T, F]]
QT = [[0.5, 0.95], [0.2, 0.9]]
ZS = two_class_logits(Q, LABELS)
ZT = two_class_logits(QT, LABELS)
Y = torch.tensor([LABELS])
L9, L6, L3, L8 = (-math.log(v) for v in (0.9, 0.6, 0.3, 0.8))


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("xor", (L9 + L6) / 2),  # selected: (0,0) teacher-only, (0,1) student-only
        ("or", (L9 + L6 + L3) / 3),
        ("and", L3),
        ("student", (L6 + L3) / 2),
    ],
)
def test_tse_loss_hand_computed_modes(mode, expected):
    loss = rdd.tse_task_loss(ZS, None, ZT, None, Y, mode=mode, min_kept=0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_tse_loss_hand_computed_normalize_all_pixels():
    loss = rdd.tse_task_loss(ZS, None, ZT, None, Y, min_kept=0, normalize="all_pixels")
    assert loss.item() == pytest.approx((L9 + L6) / 4, rel=1e-6)


def test_tse_loss_hand_computed_class_weights():
    # xor selects (0,0) label 0 and (0,1) label 1
    loss = rdd.tse_task_loss(ZS, None, ZT, None, Y, min_kept=0, class_weight=[1.0, 2.0])
    assert loss.item() == pytest.approx((1 * L9 + 2 * L6) / 3, rel=1e-6)
    loss = rdd.tse_task_loss(
        ZS, None, ZT, None, Y, min_kept=0, class_weight=torch.tensor([1.0, 2.0]), normalize="all_pixels"
    )
    assert loss.item() == pytest.approx((1 * L9 + 2 * L6) / 4, rel=1e-6)


def test_tse_loss_hand_computed_kth_path():
    # min_kept = 3: student tau = 0.8 -> hard [[F,T],[T,T]]; teacher tau = 0.9 -> [[T,F],[T,T]]
    # xor -> (0,0), (0,1)
    loss = rdd.tse_task_loss(ZS, None, ZT, None, Y, min_kept=3)
    assert loss.item() == pytest.approx((L9 + L6) / 2, rel=1e-6)
    loss = rdd.tse_task_loss(ZS, None, ZT, None, Y, min_kept=3, mode="and")  # (1,0) and (1,1)
    assert loss.item() == pytest.approx((L3 + L8) / 2, rel=1e-6)


def test_tse_loss_hand_computed_aux_with_and_without_teacher_aux():
    qa = [[0.65, 0.75], [0.99, 0.2]]  # student aux hard [[T, F], [F, T]]
    qta = [[0.1, 0.1], [0.99, 0.99]]  # teacher aux hard [[T, T], [F, F]]
    za, zta = two_class_logits(qa, LABELS), two_class_logits(qta, LABELS)
    la = [-math.log(v) for row in qa for v in row]
    main = (L9 + L6) / 2
    # aux xor with teacher aux: [[F, T], [F, T]]
    loss = rdd.tse_task_loss(ZS, za, ZT, zta, Y, min_kept=0)
    assert loss.item() == pytest.approx(main + 0.4 * (la[1] + la[3]) / 2, rel=1e-6)
    # teacher without aux head: teacher main mask [[T, F], [T, F]] stands in -> xor [[F, F], [T, T]]
    loss = rdd.tse_task_loss(ZS, za, ZT, None, Y, min_kept=0)
    assert loss.item() == pytest.approx(main + 0.4 * (la[2] + la[3]) / 2, rel=1e-6)
    # student without aux head: no aux term, teacher aux unused
    assert rdd.tse_task_loss(ZS, None, ZT, zta, Y, min_kept=0).item() == pytest.approx(main, rel=1e-6)
    # aux weight is configurable
    loss = rdd.tse_task_loss(ZS, za, ZT, zta, Y, min_kept=0, aux_weight=1.0)
    assert loss.item() == pytest.approx(main + (la[1] + la[3]) / 2, rel=1e-6)


@pytest.mark.parametrize("mode", ["xor", "or", "and", "student"])
@pytest.mark.parametrize("normalize", ["selected", "all_pixels"])
@pytest.mark.parametrize("min_kept", [0, 30, 1000])
def test_tse_loss_matches_per_pixel_reference(mode, normalize, min_kept):
    c = random_case(21)
    cw = [0.5, 1.0, 2.0]
    for class_weight in (None, cw):
        heads = (c["zs"], c["as_"], c["zt"], c["at"], c["y"])
        options = {"mode": mode, "min_kept": min_kept, "class_weight": class_weight, "normalize": normalize}
        loss = rdd.tse_task_loss(*heads, **options)
        expected = ref_tse(*heads, **options)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("confidence", ["gt_prob", "max_prob"])
@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_tse_loss_confidence_and_threshold_match_reference(confidence, threshold):
    c = random_case(4)
    loss = rdd.tse_task_loss(
        c["zs"], c["as_"], c["zt"], c["at"], c["y"], min_kept=20, threshold=threshold, confidence=confidence
    )
    expected = ref_tse(
        c["zs"], c["as_"], c["zt"], c["at"], c["y"], min_kept=20, threshold=threshold, confidence=confidence
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_tse_aux_variants_match_reference():
    c = random_case(9)
    for as_, at in ((c["as_"], None), (None, c["at"]), (None, None)):
        loss = rdd.tse_task_loss(c["zs"], as_, c["zt"], at, c["y"], min_kept=25)
        assert loss.item() == pytest.approx(ref_tse(c["zs"], as_, c["zt"], at, c["y"], min_kept=25), rel=1e-5)


def test_tse_student_mode_needs_no_teacher():
    c = random_case(2)
    a = rdd.tse_task_loss(c["zs"], c["as_"], None, None, c["y"], mode="student", min_kept=10)
    b = rdd.tse_task_loss(c["zs"], c["as_"], c["zt"], c["at"], c["y"], mode="student", min_kept=10)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="teacher_logits"):
        rdd.tse_task_loss(c["zs"], c["as_"], None, None, c["y"], mode="xor")


def test_tse_stats():
    c = random_case(13)
    loss, stats = rdd.tse_task_loss(
        c["zs"], c["as_"], c["zt"], c["at"], c["y"], min_kept=20, return_stats=True
    )
    valid = c["y"] != IGNORE
    hs = ref_hard(ref_confidence(ref_probs(c["zs"], (5, 7)), c["y"]), valid, 0.7, 20)
    ht = ref_hard(ref_confidence(ref_probs(c["zt"], (5, 7)), c["y"]), valid, 0.7, 20)
    n = valid.sum().item()
    assert stats["tse_selected_fraction"].item() == pytest.approx((hs ^ ht).sum().item() / n)
    assert stats["tse_student_hard_fraction"].item() == pytest.approx(hs.sum().item() / n)
    assert stats["tse_teacher_hard_fraction"].item() == pytest.approx(ht.sum().item() / n)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in stats.values())
    _, stats = rdd.tse_task_loss(c["zs"], None, None, None, c["y"], mode="student", return_stats=True)
    assert set(stats) == {"tse_selected_fraction", "tse_student_hard_fraction"}


def test_tse_all_ignored_stats_are_zero():
    y = torch.full((1, 4, 4), IGNORE)
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss, stats = rdd.tse_task_loss(z, None, torch.randn(1, 3, 2, 2), None, y, return_stats=True)
    assert loss.item() == 0.0 and stats["tse_selected_fraction"].item() == 0.0
    _, stats = rdd.tfe_task_loss(
        z, None, torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), y, return_stats=True
    )
    assert stats["tfe_weight_mean"].item() == 0.0


# ------------------------------------------------------------------------------------- class weights
def test_class_weight_named_cityscapes():
    assert len(rdd.CITYSCAPES_CLASS_WEIGHTS) == 19
    assert rdd.CITYSCAPES_CLASS_WEIGHTS[0] == 0.8373 and rdd.CITYSCAPES_CLASS_WEIGHTS[-1] == 1.0507
    assert rdd.NAMED_CLASS_WEIGHTS["cityscapes"] == rdd.CITYSCAPES_CLASS_WEIGHTS
    w = rdd.resolve_class_weight("cityscapes", 19)
    assert w.dtype == torch.float32 and w.tolist() == pytest.approx(list(rdd.CITYSCAPES_CLASS_WEIGHTS))
    assert rdd.resolve_class_weight(None, 19) is None
    c = random_case(17, C=19, h=2, w=3, H=4, W=5)
    by_name = rdd.tse_task_loss(
        c["zs"], c["as_"], c["zt"], c["at"], c["y"], class_weight="cityscapes", min_kept=8
    )
    expected = ref_tse(
        c["zs"], c["as_"], c["zt"], c["at"], c["y"], min_kept=8, class_weight=rdd.CITYSCAPES_CLASS_WEIGHTS
    )
    assert by_name.item() == pytest.approx(expected, rel=1e-5)


def test_class_weight_errors():
    with pytest.raises(ValueError, match="known names: 'cityscapes'"):
        rdd.resolve_class_weight("camvid", 11)
    with pytest.raises(ValueError, match="3 values but the logits have 2 classes"):
        rdd.resolve_class_weight([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match="non-negative"):
        rdd.resolve_class_weight([1.0, -2.0], 2)
    with pytest.raises(ValueError, match="19 values"):
        rdd.tse_task_loss(ZS, None, ZT, None, Y, class_weight="cityscapes")


# ---------------------------------------------------------------------------------- option validation
@pytest.mark.parametrize(
    "call, name, value",
    [
        (lambda: rdd.tse_task_loss(ZS, None, ZT, None, Y, mode="nand"), "mode", "nand"),
        (lambda: rdd.tse_task_loss(ZS, None, ZT, None, Y, normalize="batch"), "normalize", "batch"),
        (lambda: rdd.tse_task_loss(ZS, None, ZT, None, Y, confidence="entropy"), "confidence", "entropy"),
        (lambda: rdd.hard_pixel_mask(ZS, Y, confidence="entropy"), "confidence", "entropy"),
        (lambda: rdd.tfe_weight(MAIN_1PX, AUX_1PX, (1, 1), kl_direction="sym"), "kl_direction", "sym"),
        (lambda: rdd.tfe_task_loss(ZS, None, ZT, ZT, Y, kl_direction="sym"), "kl_direction", "sym"),
        (lambda: rdd.combine_hard_masks(Y > 0, Y > 0, "XOR"), "mode", "XOR"),
    ],
)
def test_bad_option_strings_name_argument_value_and_choices(call, name, value):
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert f"{name}={value!r}" in msg and "allowed values" in msg


def test_bad_shapes_and_min_kept():
    with pytest.raises(ValueError, match="min_kept"):
        rdd.tse_task_loss(ZS, None, ZT, None, Y, min_kept=-1)
    with pytest.raises(ValueError, match="batch size"):
        rdd.tse_task_loss(ZS.expand(2, -1, -1, -1), None, ZT, None, Y)
    with pytest.raises(ValueError, match="target"):
        rdd.tse_task_loss(ZS, None, ZT, None, Y.float())


# ------------------------------------------------------------------------- gradients, empty masks, AMP
@pytest.mark.parametrize("stage", ["tfe", "tse"])
def test_gradients_reach_only_the_student(stage):
    c = random_case(31)
    zt = c["zt"].clone().requires_grad_(True)
    at = c["at"].clone().requires_grad_(True)
    if stage == "tfe":
        loss = rdd.tfe_task_loss(c["zs"], c["as_"], zt, at, c["y"])
    else:
        loss = rdd.tse_task_loss(c["zs"], c["as_"], zt, at, c["y"], min_kept=30)
    loss.backward()
    assert zt.grad is None and at.grad is None
    assert c["zs"].grad is not None and c["zs"].grad.abs().sum() > 0
    assert c["as_"].grad is not None and c["as_"].grad.abs().sum() > 0


def test_tse_gradient_matches_reference_autograd():
    # gradient of the selected-pixel CE w.r.t. student logits, against an autograd reference in float64
    c = random_case(41, aux=False)
    loss = rdd.tse_task_loss(c["zs"], None, c["zt"], None, c["y"], min_kept=30, class_weight=[1.0, 2.0, 0.5])
    loss.backward()
    valid = c["y"] != IGNORE
    size = (5, 7)
    ms = ref_hard(ref_confidence(ref_probs(c["zs"], size), c["y"]), valid, 0.7, 30)
    mt = ref_hard(ref_confidence(ref_probs(c["zt"], size), c["y"]), valid, 0.7, 30)
    sel = ms ^ mt
    z64 = c["zs"].detach().double().requires_grad_(True)
    up = F.interpolate(z64, size=size, mode="bilinear", align_corners=True)
    tgt = torch.where(sel, c["y"], torch.full_like(c["y"], IGNORE))
    ref = F.cross_entropy(
        up, tgt, weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), ignore_index=IGNORE
    )
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(c["zs"].grad.double(), z64.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["xor", "or", "and", "student"])
def test_empty_selection_gives_exact_zero_and_zero_gradient(mode):
    zs = torch.randn(2, 3, 2, 2, requires_grad=True)
    as_ = torch.randn(2, 3, 2, 2, requires_grad=True)
    y = torch.full((2, 4, 4), IGNORE)
    for normalize in ("selected", "all_pixels"):
        zs.grad = as_.grad = None
        teacher = (torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2))
        loss = rdd.tse_task_loss(
            zs, as_, *teacher, y, mode=mode, normalize=normalize, class_weight=[1.0, 2.0, 3.0]
        )
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(zs.grad, torch.zeros_like(zs)) and torch.equal(as_.grad, torch.zeros_like(as_))


def test_and_mode_with_disjoint_masks_is_zero_not_nan():
    zs = ZS.clone().requires_grad_(True)
    # teacher hard exactly where the student is easy -> AND empty
    zt = two_class_logits([[0.1, 0.9], [0.9, 0.1]], LABELS)
    loss = rdd.tse_task_loss(zs, None, zt, None, Y, mode="and", min_kept=0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(zs.grad, torch.zeros_like(zs))


@pytest.mark.parametrize("stage", ["tfe", "tse"])
def test_autocast_bf16_gives_float32_close_to_fp32(stage):
    c = random_case(51)
    args32 = [c["zs"].detach(), c["as_"].detach(), c["zt"], c["at"]]
    args16 = [a.bfloat16() for a in args32]
    fn = (
        (lambda *a: rdd.tfe_task_loss(*a, c["y"]))
        if stage == "tfe"
        else (lambda *a: rdd.tse_task_loss(*a, c["y"], min_kept=30))
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = fn(*args16)
    assert loss16.dtype == torch.float32
    # inside, the bf16 values are cast to float32: identical to feeding the upcast tensors
    torch.testing.assert_close(loss16, fn(*[a.float() for a in args16]), atol=1e-6, rtol=1e-6)
    # close to the float32 logits' result (for this seed no pixel's q lies within bf16 rounding of a
    # TSE threshold, so the masks agree and only the CE values move)
    torch.testing.assert_close(loss16, fn(*args32), atol=0, rtol=5e-3)
    w16 = rdd.tfe_weight(args16[2], args16[3], (5, 7))
    assert w16.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask = rdd.hard_pixel_mask(args16[0], c["y"], min_kept=30)
    assert mask.dtype == torch.bool


# -------------------------------------------------------------------------------------- property tests
def _logits(draw, shape, bound=20.0):
    vals = draw(
        st.lists(
            st.floats(-bound, bound, allow_nan=False, width=32),
            min_size=math.prod(shape),
            max_size=math.prod(shape),
        )
    )
    return torch.tensor(vals, dtype=torch.float32).reshape(shape)


@st.composite
def seg_case(draw, all_ignored=False):
    B = draw(st.integers(1, 2))
    C = draw(st.integers(2, 4))
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    labels = draw(st.lists(st.sampled_from([*range(C), IGNORE]), min_size=B * H * W, max_size=B * H * W))
    y = torch.tensor(labels).reshape(B, H, W)
    if all_ignored:
        y = torch.full_like(y, IGNORE)
    heads = {k: _logits(draw, (B, C, h, w)) for k in ("zs", "as_", "zt", "at")}
    return heads, y


@FAST
@given(seg_case(), st.floats(0.05, 0.95), st.integers(0, 60))
def test_property_xor_mask_symmetric(case, threshold, min_kept):
    heads, y = case
    ms = rdd.hard_pixel_mask(heads["zs"], y, threshold=threshold, min_kept=min_kept)
    mt = rdd.hard_pixel_mask(heads["zt"], y, threshold=threshold, min_kept=min_kept)
    assert torch.equal(rdd.combine_hard_masks(ms, mt, "xor"), rdd.combine_hard_masks(mt, ms, "xor"))
    assert not (rdd.combine_hard_masks(ms, mt, "xor") & ~(y != IGNORE)).any()


@FAST
@given(seg_case(), st.sampled_from(["aux_to_main", "main_to_aux"]))
def test_property_tfe_weights_in_unit_interval(case, direction):
    heads, y = case
    w = rdd.tfe_weight(heads["zt"], heads["at"], y.shape[-2:], kl_direction=direction)
    assert w.shape == y.shape
    assert (w > 0).all() and (w <= 1).all()


@FAST
@given(
    st.lists(
        st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.69, 0.7, 0.71, 0.9, 1.0]) | st.floats(0, 1, width=32),
        min_size=1,
        max_size=40,
    ),
    st.data(),
    st.floats(0.0, 1.0),
    st.integers(0, 50),
)
def test_property_fast_threshold_equals_full_sort(values, data, threshold, min_kept):
    q = torch.tensor(values, dtype=torch.float32)
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    q = torch.where(valid, q, torch.ones_like(q))  # contract: q = 1 at ignored pixels
    thr32 = float(torch.tensor(threshold, dtype=torch.float32))
    tau_ref = ref_threshold(q, valid, thr32, min_kept)
    tau = rdd.hard_pixel_threshold(q, valid, threshold=threshold, min_kept=min_kept)
    assert tau.item() == tau_ref
    assert torch.equal(
        rdd.hard_mask_from_confidence(q, valid, threshold=threshold, min_kept=min_kept),
        valid & (q <= tau_ref),
    )


@FAST
@given(
    seg_case(),
    st.sampled_from(["xor", "or", "and", "student"]),
    st.sampled_from(["selected", "all_pixels"]),
    st.integers(0, 60),
    st.booleans(),
)
def test_property_losses_finite(case, mode, normalize, min_kept, aux):
    heads, y = case
    zs = heads["zs"].requires_grad_(True)
    as_ = heads["as_"].requires_grad_(True) if aux else None
    loss = rdd.tse_task_loss(
        zs, as_, heads["zt"], heads["at"], y, mode=mode, normalize=normalize, min_kept=min_kept
    )
    loss_tfe = rdd.tfe_task_loss(zs, as_, heads["zt"], heads["at"], y)
    (loss + loss_tfe).backward()
    assert torch.isfinite(loss) and torch.isfinite(loss_tfe) and loss >= 0 and loss_tfe >= 0
    assert torch.isfinite(zs.grad).all()


@FAST
@given(seg_case(all_ignored=True), st.sampled_from(["xor", "or", "and", "student"]))
def test_property_all_ignored_is_exact_zero_with_zero_grad(case, mode):
    heads, y = case
    zs = heads["zs"].requires_grad_(True)
    as_ = heads["as_"].requires_grad_(True)
    loss = rdd.tse_task_loss(zs, as_, heads["zt"], heads["at"], y, mode=mode)
    loss_tfe = rdd.tfe_task_loss(zs, as_, heads["zt"], heads["at"], y)
    assert loss.item() == 0.0 and loss_tfe.item() == 0.0
    (loss + loss_tfe).backward()
    assert torch.equal(zs.grad, torch.zeros_like(zs)) and torch.equal(as_.grad, torch.zeros_like(as_))

"""Structured KD (rdd_lightning.losses.skd): pair-wise similarity against loops, the adversarial pair's
gradients and the discriminator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rdd_lightning.losses import (
    DISCRIMINATOR_LOSS_WEIGHT,
    DISCRIMINATOR_OPTIMIZER,
    SKDDiscriminator,
    discriminator_loss,
    generator_loss,
    pairwise_similarity_loss,
)
from tests.test_kd import explicit_bilinear


# ------------------------------------------------------------------------------------------ pair-wise term
def ref_nodes(f: torch.Tensor, k: int) -> list[list[list[float]]]:
    """Per image, the list of max-pooled node vectors (k x k windows, the last ones clipped), float64."""
    f = f.detach().double()
    B, C, h, w = f.shape
    images = []
    for b in range(B):
        nodes = []
        for i0 in range(0, h, k):
            for j0 in range(0, w, k):
                window = f[b, :, i0 : min(i0 + k, h), j0 : min(j0 + k, w)]
                nodes.append([float(window[c].max()) for c in range(C)])
        images.append(nodes)
    return images


def ref_pairwise(fs: torch.Tensor, ft: torch.Tensor, k: int) -> float:
    def sims(nodes):
        unit = [[v / math.sqrt(sum(x * x for x in n)) for v in n] for n in nodes]
        return [[sum(a * b for a, b in zip(p, q, strict=True)) for q in unit] for p in unit]

    total, count = 0.0, 0
    for ns, nt in zip(ref_nodes(fs, k), ref_nodes(ft, k), strict=True):
        ss, st = sims(ns), sims(nt)
        for rs, rt in zip(ss, st, strict=True):
            total += sum((a - b) ** 2 for a, b in zip(rs, rt, strict=True))
            count += len(rs)
    return total / count


@pytest.mark.parametrize("pool_size", [1, 2, 3])
def test_pairwise_matches_loop_reference_on_odd_sizes(pool_size):
    g = torch.Generator().manual_seed(pool_size)
    fs, ft = torch.randn(2, 3, 5, 3, generator=g), torch.randn(2, 6, 5, 3, generator=g)
    loss = pairwise_similarity_loss(fs, ft, pool_size=pool_size)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_pairwise(fs, ft, pool_size), rel=1e-5)


def test_pairwise_resizes_student_and_is_zero_for_equal_structure():
    g = torch.Generator().manual_seed(4)
    fs, ft = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 4, 4, 6, generator=g)
    expected = ref_pairwise(explicit_bilinear(fs, 4, 6), ft, 2)
    assert pairwise_similarity_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)
    f = torch.randn(2, 4, 4, 4)
    assert pairwise_similarity_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert pairwise_similarity_loss(3.0 * f, f).item() == pytest.approx(0.0, abs=1e-7)


def test_pairwise_gradient_only_to_student():
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ft = torch.randn(2, 5, 4, 4, requires_grad=True)
    pairwise_similarity_loss(fs, ft).backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- adversarial term
class FirstChannelCritic(nn.Module):
    """A stand-in critic whose score map is 2 * (first input channel) + b."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.scale * x[:, :1] + self.bias


def test_generator_and_hinge_losses_match_formulas():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    critic = FirstChannelCritic()
    d_s = [2.0 * float(v) + 0.5 for v in zs[:, 0].flatten()]
    d_t = [2.0 * float(v) + 0.5 for v in zt[:, 0].flatten()]
    assert generator_loss(critic, zs).item() == pytest.approx(-sum(d_s) / len(d_s), rel=1e-6)
    hinge = sum(max(0.0, 1 - v) for v in d_t) / len(d_t) + sum(max(0.0, 1 + v) for v in d_s) / len(d_s)
    assert discriminator_loss(critic, zs, zt).item() == pytest.approx(hinge, rel=1e-6)


def test_generator_loss_resizes_to_given_size():
    # seeded: with the global RNG the mean could land near 0, where float32 rounding exceeds any relative bound
    zs = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    critic = FirstChannelCritic()
    up = explicit_bilinear(zs, 3, 5)[:, 0]
    expected = -(2.0 * up + 0.5).mean().item()
    assert abs(expected) > 0.1
    assert generator_loss(critic, zs, size=(3, 5)).item() == pytest.approx(expected, rel=1e-6)


def test_discriminator_gets_gradient_only_from_its_own_loss():
    torch.manual_seed(0)
    critic = SKDDiscriminator(3, base_channels=8)
    zs = torch.randn(2, 3, 8, 8, requires_grad=True)
    zt = torch.randn(2, 3, 8, 8, requires_grad=True)
    generator_loss(critic, zs).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.requires_grad for p in critic.parameters())  # unfrozen again afterwards
    zs.grad = None
    discriminator_loss(critic, zs, zt).backward()
    assert zs.grad is None and zt.grad is None
    grads = [p.grad for p in critic.parameters() if p.grad is not None]
    assert grads and sum(float(gr.abs().sum()) for gr in grads) > 0


def test_generator_loss_unfreezes_the_critic_after_an_error():
    critic = SKDDiscriminator(3, base_channels=8)
    with pytest.raises(ValueError):
        generator_loss(critic, torch.randn(2, 4, 8, 8))  # wrong class count
    assert all(p.requires_grad for p in critic.parameters())


def test_student_and_discriminator_optimizers_step_separately():
    torch.manual_seed(1)
    student = nn.Conv2d(3, 3, kernel_size=1)
    critic = SKDDiscriminator(3, base_channels=8)
    student_opt = torch.optim.SGD(student.parameters(), lr=0.1)
    critic_opt = torch.optim.Adam(critic.parameters(), **DISCRIMINATOR_OPTIMIZER)
    x, zt = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    critic_before = [p.detach().clone() for p in critic.parameters()]
    student_before = [p.detach().clone() for p in student.parameters()]
    generator_loss(critic, student(x)).backward()
    student_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(critic_before, critic.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(student_before, student.parameters(), strict=True))
    student_opt.zero_grad()
    student_after = [p.detach().clone() for p in student.parameters()]
    (DISCRIMINATOR_LOSS_WEIGHT * discriminator_loss(critic, student(x), zt)).backward()
    critic_opt.step()
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(student_after, student.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(critic_before, critic.parameters(), strict=True))


@pytest.mark.parametrize(("h", "w"), [(1, 1), (3, 5), (16, 16), (33, 20)])
def test_discriminator_shapes(h, w):
    critic = SKDDiscriminator(4, base_channels=8)
    out = critic(torch.randn(2, 4, h, w))
    assert out.shape == (2, 1, math.ceil(h / 16), math.ceil(w / 16))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        critic(torch.randn(2, 3, h, w))


def test_discriminator_losses_float32_under_autocast():
    critic = SKDDiscriminator(3, base_channels=8)
    zs, zt = torch.randn(2, 3, 8, 8).bfloat16(), torch.randn(2, 3, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_loss = generator_loss(critic, zs)
        d_loss = discriminator_loss(critic, zs, zt)
    assert g_loss.dtype == torch.float32 and d_loss.dtype == torch.float32
    assert torch.isfinite(g_loss) and d_loss >= 0


def test_published_discriminator_settings():
    assert DISCRIMINATOR_OPTIMIZER == {"lr": 4e-4, "betas": (0.9, 0.99)}
    assert DISCRIMINATOR_LOSS_WEIGHT == 0.1

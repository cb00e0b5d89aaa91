"""Cross-image relational KD (rdd_lightning.losses.cirkd): relation losses against loops, the memory queues,
and the cross-process gather (2 CPU processes with gloo)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rdd_lightning.losses import (
    CIRKDMemory,
    gather_across_processes,
    memory_contrast_loss,
    minibatch_pixel_relation_loss,
)
from tests.test_kd import explicit_bilinear

IGNORE = 255


# ------------------------------------------------------------------------------------------ references
def unit_rows(f: torch.Tensor) -> list[list[list[float]]]:
    """[B, C, h, w] -> per image, the list of L2-normalised pixel vectors (float64 lists)."""
    f = f.detach().double()
    B, C = f.shape[:2]
    out = []
    for b in range(B):
        pixels = f[b].reshape(C, -1).t().tolist()
        out.append([[v / math.sqrt(sum(x * x for x in p)) for v in p] for p in pixels])
    return out


def log_softmax_list(x: list[float]) -> list[float]:
    m = max(x)
    z = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - z for v in x]


def kl_rows(t_logits: list[float], s_logits: list[float]) -> float:
    lt, ls = log_softmax_list(t_logits), log_softmax_list(s_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls, strict=True))


def dot(p, q) -> float:
    return sum(a * b for a, b in zip(p, q, strict=True))


def ref_minibatch(fs: torch.Tensor, ft: torch.Tensor, tau: float) -> float:
    s, t = unit_rows(fs), unit_rows(ft)
    B, N = len(s), len(s[0])
    total = 0.0
    for i in range(B):
        for j in range(B):
            pair = 0.0
            for n in range(N):
                pair += kl_rows([dot(t[i][n], q) / tau for q in t[j]], [dot(s[i][n], q) / tau for q in s[j]])
            total += pair / N
    return total / (B * B)


def ref_memory(s: torch.Tensor, t: torch.Tensor, keys: torch.Tensor, tau: float, kd_t: float) -> float:
    s, t, k = s.double().tolist(), t.double().tolist(), keys.double().tolist()
    if not s:
        return 0.0
    total = 0.0
    for sp, tp in zip(s, t, strict=True):
        total += kl_rows([dot(tp, q) / tau / kd_t for q in k], [dot(sp, q) / tau / kd_t for q in k])
    return kd_t * kd_t * total / len(s)


# ------------------------------------------------------------------------------------ mini-batch term
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_minibatch_matches_loop_reference(tau):
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(3, 4, 2, 3, generator=g), torch.randn(3, 6, 2, 3, generator=g)
    loss = minibatch_pixel_relation_loss(fs, ft, temperature=tau)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_minibatch(fs, ft, tau), rel=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 100])
def test_minibatch_in_row_blocks_has_the_whole_terms_value_and_gradient(chunk_rows):
    """chunk_rows (blocks of anchor pixels, recomputed in backward) against the unchunked term and the loop
    reference, value and gradient; 4 and 7 do not divide N = 15, 100 is one block larger than N."""
    g = torch.Generator().manual_seed(2)
    fs = torch.randn(3, 4, 3, 5, generator=g, requires_grad=True)
    ft = torch.randn(3, 6, 3, 5, generator=g)
    whole = minibatch_pixel_relation_loss(fs, ft, chunk_rows=None)
    (grad_whole,) = torch.autograd.grad(whole, fs)
    blocks = minibatch_pixel_relation_loss(fs, ft, chunk_rows=chunk_rows)
    (grad_blocks,) = torch.autograd.grad(blocks, fs)
    assert blocks.item() == pytest.approx(ref_minibatch(fs.detach(), ft, 0.1), rel=1e-5)
    assert blocks.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(grad_blocks, grad_whole, rtol=1e-5, atol=1e-7)
    assert grad_whole.abs().sum() > 0


def test_minibatch_pooling_and_resizing():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    pooled = minibatch_pixel_relation_loss(fs, ft, pool_size=2)
    assert pooled.item() == pytest.approx(
        ref_minibatch(F.avg_pool2d(fs, 2), F.avg_pool2d(ft, 2), 0.1), rel=1e-5
    )
    small = torch.randn(2, 3, 2, 3, generator=g)
    ft = torch.randn(2, 5, 3, 4, generator=g)
    expected = ref_minibatch(explicit_bilinear(small, 3, 4), ft, 0.1)
    assert minibatch_pixel_relation_loss(small, ft).item() == pytest.approx(expected, rel=1e-5)


def test_minibatch_zero_for_identical_and_gradient_only_to_student():
    f = torch.randn(2, 3, 2, 2)
    assert minibatch_pixel_relation_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    fs = torch.randn(2, 3, 2, 2, requires_grad=True)
    ft = torch.randn(2, 4, 2, 2, requires_grad=True)
    minibatch_pixel_relation_loss(fs, ft).backward()
    assert ft.grad is None and fs.grad is not None and fs.grad.abs().sum() > 0


def test_gather_is_a_noop_without_distributed():
    x = torch.randn(2, 3, requires_grad=True)
    assert not dist.is_initialized()
    assert gather_across_processes(x) is x


# ---------------------------------------------------------------------------------------- memory terms
def test_memory_contrast_loss_matches_reference_and_handles_no_pixels():
    g = torch.Generator().manual_seed(2)
    s = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    t = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    keys = F.normalize(torch.randn(7, 4, generator=g), dim=1)
    for tau, kd_t in ((0.1, 1.0), (0.5, 2.0)):
        loss = memory_contrast_loss(s, t, keys, temperature=tau, kd_temperature=kd_t)
        assert loss.item() == pytest.approx(ref_memory(s, t, keys, tau, kd_t), rel=1e-5)
    assert memory_contrast_loss(t, t.clone(), keys).item() == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = memory_contrast_loss(empty, torch.zeros(0, 4), keys)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(empty.grad, torch.zeros(0, 4))


def small_memory(**kw) -> CIRKDMemory:
    options = {"pixel_memory_size": 5, "region_memory_size": 3, "pixels_per_update": 2}
    options.update(kw)
    return CIRKDMemory(2, 3, 4, **options)


def test_memory_buffers_are_unit_vectors_and_in_the_state_dict():
    torch.manual_seed(0)
    memory = small_memory()
    state = memory.state_dict()
    for name in ("pixel_queue", "pixel_queue_ptr", "region_queue", "region_queue_ptr"):
        assert name in state
    assert memory.pixel_queue.shape == (2, 5, 4) and memory.region_queue.shape == (2, 3, 4)
    torch.testing.assert_close(memory.pixel_queue.norm(dim=2), torch.ones(2, 5))
    other = small_memory()
    other.load_state_dict(state)
    assert torch.equal(other.pixel_queue, memory.pixel_queue)


def test_memory_enqueue_fills_a_subset_and_the_region_mean():
    torch.manual_seed(1)
    memory = small_memory()
    before = memory.pixel_queue.clone()
    g = torch.Generator().manual_seed(3)
    t = F.normalize(torch.randn(1, 4, 2, 3, generator=g), dim=1)
    labels = torch.tensor([[[0, 0, 0], [1, IGNORE, 7]]])  # 3 pixels of class 0, 1 of class 1, 2 void
    memory.enqueue(t, labels)
    pixels = t[0].reshape(4, -1).t()  # [6, 4]
    class0 = pixels[:3]
    # two of the three class-0 pixels in slots 0 and 1, distinct; nothing else of class 0 changed
    for slot in (0, 1):
        assert any(torch.allclose(memory.pixel_queue[0, slot], p, atol=1e-6) for p in class0)
    assert not torch.equal(memory.pixel_queue[0, 0], memory.pixel_queue[0, 1])
    assert torch.equal(memory.pixel_queue[0, 2:], before[0, 2:])
    torch.testing.assert_close(memory.pixel_queue[1, 0], pixels[3])
    assert torch.equal(memory.pixel_queue[1, 1:], before[1, 1:])
    assert memory.pixel_queue_ptr.tolist() == [2, 1]
    torch.testing.assert_close(memory.region_queue[0, 0], F.normalize(class0.mean(0), dim=0))
    torch.testing.assert_close(memory.region_queue[1, 0], pixels[3])
    assert memory.region_queue_ptr.tolist() == [1, 1]


def test_memory_pixel_queues_hold_only_pixels_of_their_class():
    # Each class sits away from the start of the map (class 0 on the bottom row, class 1 in the middle, void
    # on top): the published enqueue, which reads its random indices below the class's pixel count as
    # positions of the whole map, would store void pixels of the top rows here. Ours stores the class's own.
    torch.manual_seed(8)
    memory = small_memory()  # pixel queue 5, 2 pixels per class and image
    g = torch.Generator().manual_seed(9)
    t = F.normalize(torch.randn(1, 4, 4, 4, generator=g), dim=1)
    labels = torch.full((1, 4, 4), IGNORE)
    labels[0, 3] = 0
    labels[0, 1:3] = 1
    pixels = t[0].reshape(4, -1).t()  # [16, 4], raster order
    own = {c: pixels[labels.reshape(-1) == c] for c in (0, 1)}
    for _ in range(3):  # 3 x 2 entries per class: every one of the 5 slots rewritten
        memory.enqueue(t, labels)
    for c in (0, 1):
        for entry in memory.pixel_queue[c]:
            assert (entry - own[c]).abs().amax(dim=1).min() < 1e-6


def test_memory_queues_wrap_around_and_never_grow():
    torch.manual_seed(2)
    memory = small_memory()  # pixel queue 5, region queue 3, 2 pixels per class and image
    g = torch.Generator().manual_seed(4)
    vectors = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    expected_pixels = memory.pixel_queue[0].clone()
    expected_regions = memory.region_queue[0].clone()
    for step in range(6):
        t = vectors[step].view(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous()  # all pixels equal
        labels = torch.tensor([[[0, 0], [IGNORE, IGNORE]]])
        memory.enqueue(t, labels)
        for r in range(2):
            expected_pixels[(2 * step + r) % 5] = vectors[step]
        expected_regions[step % 3] = vectors[step]
        assert memory.pixel_queue.shape == (2, 5, 4) and memory.region_queue.shape == (2, 3, 4)
        assert memory.pixel_queue_ptr[0].item() == (2 * (step + 1)) % 5
        assert memory.region_queue_ptr[0].item() == (step + 1) % 3
        torch.testing.assert_close(memory.pixel_queue[0], expected_pixels)
        torch.testing.assert_close(memory.region_queue[0], expected_regions)
    assert memory.pixel_queue_ptr[1].item() == 0 and memory.region_queue_ptr[1].item() == 0


def test_memory_enqueues_at_most_the_queue_size_per_image():
    memory = small_memory(pixels_per_update=16)  # more than the 5 slots
    t = F.normalize(torch.randn(1, 4, 3, 3), dim=1)
    memory.enqueue(t, torch.zeros(1, 3, 3, dtype=torch.long))  # 9 pixels of class 0
    assert memory.pixel_queue_ptr.tolist() == [0, 0]  # exactly 5 written: pointer back at 0
    written = {tuple(round(v, 5) for v in row.tolist()) for row in memory.pixel_queue[0]}
    assert len(written) == 5


def test_sample_keys_sizes():
    memory = small_memory(pixel_contrast_size=3, region_contrast_size=100)
    pixel_keys, region_keys = memory.sample_keys()
    assert pixel_keys.shape == (2 * (3 // 2 + 1), 4)  # 2 per class
    assert region_keys.shape == (2 * 3, 4)  # capped at the region queue size
    per_class = pixel_keys.view(2, 2, 4)
    for c in range(2):
        for key in per_class[c]:
            assert any(torch.equal(key, row) for row in memory.pixel_queue[c])


def test_memory_forward_matches_reference_in_eval_mode():
    torch.manual_seed(5)
    memory = small_memory(pixel_contrast_size=4, region_contrast_size=2).eval()
    g = torch.Generator().manual_seed(6)
    fs, ft = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    y = torch.tensor([[[0, 1], [IGNORE, 1]], [[0, 0], [1, IGNORE]]])
    ptrs = memory.pixel_queue_ptr.clone()
    torch.manual_seed(7)
    pixel, region = memory(fs, ft, y)
    assert torch.equal(memory.pixel_queue_ptr, ptrs)  # eval mode: nothing enqueued
    torch.manual_seed(7)
    pixel_keys, region_keys = memory.sample_keys()
    with torch.no_grad():
        s = F.normalize(memory.projector(fs), dim=1)
    t = F.normalize(ft, dim=1)
    valid = (y != IGNORE).flatten()
    s_pix = s.permute(0, 2, 3, 1).reshape(-1, 4)[valid]
    t_pix = t.permute(0, 2, 3, 1).reshape(-1, 4)[valid]
    assert pixel.item() == pytest.approx(ref_memory(s_pix, t_pix, pixel_keys, 0.1, 1.0), rel=1e-5)
    assert region.item() == pytest.approx(ref_memory(s_pix, t_pix, region_keys, 0.1, 1.0), rel=1e-5)


def test_memory_forward_gradients_and_training_enqueue():
    memory = small_memory().train()
    fs = torch.randn(2, 3, 2, 2, requires_grad=True)
    ft = torch.randn(2, 4, 4, 4, requires_grad=True)  # teacher at a higher resolution
    y = torch.randint(0, 2, (2, 8, 8))
    pixel, region = memory(fs, ft, y)
    (pixel + region).backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert all(p.grad is not None for p in memory.projector.parameters())
    assert memory.region_queue_ptr.sum().item() > 0  # training mode enqueues


def test_memory_forward_without_valid_pixels_is_zero_not_nan():
    memory = small_memory()
    fs = torch.randn(2, 3, 2, 2, requires_grad=True)
    pixel, region = memory(fs, torch.randn(2, 4, 2, 2), torch.full((2, 2, 2), IGNORE))
    (pixel + region).backward()
    assert pixel.item() == 0.0 and region.item() == 0.0
    assert torch.equal(fs.grad, torch.zeros_like(fs))
    assert memory.pixel_queue_ptr.tolist() == [0, 0]


def test_memory_rejects_wrong_channels():
    memory = small_memory()
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        memory(torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 3, h, w\]"):
        memory(torch.randn(1, 2, 2, 2), torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="pixel_memory_size"):
        CIRKDMemory(2, 3, 4, pixel_memory_size=0)


# ------------------------------------------------------------------------- two processes (gloo, CPU)
def _two_process_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # uneven local batches: rank 0 holds 1 row, rank 1 holds 2
        x = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)
        gathered = gather_across_processes(x)
        weights = torch.arange(1, gathered.shape[0] + 1, dtype=torch.float32)[:, None] * (rank + 1)
        (weights * gathered).sum().backward()
        # the mini-batch loss over a global batch of 4 images, 2 per process
        torch.manual_seed(0)
        fs_all, ft_all = torch.randn(4, 3, 2, 3), torch.randn(4, 5, 2, 3)
        fs = fs_all[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
        loss = minibatch_pixel_relation_loss(fs, ft_all[2 * rank : 2 * rank + 2])
        loss.backward()
        # the memory sees the global batch: each process has one image of one class
        torch.manual_seed(1)
        memory = CIRKDMemory(2, 3, 5, pixel_memory_size=4, region_memory_size=3)
        memory(fs[:1].detach(), ft_all[2 * rank : 2 * rank + 1], torch.full((1, 2, 3), rank))
        result = {
            "gathered": gathered.detach(),
            "x_grad": x.grad,
            "loss": loss.detach(),
            "grad": fs.grad,
            "region_ptr": memory.region_queue_ptr.clone(),
            "pixel_ptr": memory.pixel_queue_ptr.clone(),
        }
        torch.save(result, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_gather_the_global_batch(tmp_path):
    mp.spawn(_two_process_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    expected = torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]])
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)
    # local slice gradient = sum over processes of d(loss_r)/d(row): rows weighted (i+1)*(r+1), r = 0, 1
    assert torch.equal(r0["x_grad"], torch.tensor([[3.0, 3.0]]))
    assert torch.equal(r1["x_grad"], torch.tensor([[6.0, 6.0], [9.0, 9.0]]))
    # mean of the processes' losses = the single-process loss over all 16 image pairs; the per-process
    # gradients, averaged as DDP does, are its gradient
    torch.manual_seed(0)
    fs_all, ft_all = torch.randn(4, 3, 2, 3).requires_grad_(True), torch.randn(4, 5, 2, 3)
    full = minibatch_pixel_relation_loss(fs_all, ft_all)
    full.backward()
    assert ((r0["loss"] + r1["loss"]) / 2).item() == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([r0["grad"], r1["grad"]]) / 2, fs_all.grad, atol=1e-7, rtol=1e-4)
    for r in (r0, r1):
        assert r["region_ptr"].tolist() == [1, 1]  # both processes enqueued both images
        assert r["pixel_ptr"].tolist() == [4 % 4, 4 % 4]  # 6 pixels per class, 16 per update, queue 4

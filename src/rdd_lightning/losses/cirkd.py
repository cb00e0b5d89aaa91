"""Cross-image relational knowledge distillation (CIRKD; Yang, Zhou, Zhang, Ding, Tian, "Cross-Image
Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022).

CIRKD transfers the teacher's pixel relations *across images* with three terms on the feature map before the
classifier (all embeddings L2-normalised over channels):

* **Mini-batch pixel-to-pixel** (:func:`minibatch_pixel_relation_loss`). For every ordered pair of images
  ``(i, j)`` of the batch, the ``N x N`` similarity matrix of their pixel embeddings is turned row-wise into a
  distribution with a softmax at temperature ``tau = 0.1``; the student's rows match the teacher's by KL:

      S_ij = F_i^T F_j / tau,   L_mb = 1/B^2 sum_{i,j} 1/N sum_rows KL(softmax(S^t_ij) || softmax(S^s_ij))

  The similarity matrices are channel-free, so the raw student feature is used (no projection).
* **Memory pixel-to-pixel and pixel-to-region** (:class:`CIRKDMemory`). Per class, a queue of teacher pixel
  embeddings and a queue of teacher region embeddings (the mean embedding of a class's pixels in one image)
  remember past batches. The student's pixels (through a learnable projection head to the teacher's width)
  and the teacher's pixels are compared with a random sample of keys from each queue; the similarities divided
  by ``tau = 0.1`` are softened with ``T_kd = 1`` and matched by KL (:func:`memory_contrast_loss`):

      L_mem = T_kd^2 * 1/|V| sum_{p in V} KL(softmax(t_p K^T / tau / T_kd) || softmax(s_p K^T / tau / T_kd))

  over the valid (non-void) pixels ``V`` of the local batch.

Default recipe (CIRKD's ``train_cirkd.py``): ``CIRKD = KD 1 + mini-batch 1 + memory pixel 0.1 + memory region
0.1`` (VOC: memory weights 0.01); pixel queues of 20000 and region queues of 2000 entries per class; 4096
pixel and 1024 region keys per step in total (``size // C + 1`` per class); 16 pixels per class and image
enqueued per step; ``tau = 0.1``, ``T_kd = 1``. The RDD paper quotes CIRKD 76.38 (Cityscapes, DeepLabV3-R18)
and CIRKD+RDD 76.69.

Distributed training: the cross-image terms see the **global** batch. :func:`gather_across_processes`
concatenates every process's tensor (the local part keeps its gradient). In the mini-batch term each process
takes its own images as anchors ``i`` and the whole global batch as partners ``j``; the mean of the processes'
losses is the loss over all global pairs, and the gather's backward sums, for the local part, the gradients
sent to it by every process, so with DDP's gradient averaging the update is that of the single-process loss
over the global batch. Every process enqueues the teacher embeddings of the whole global batch (as published).

Deliberate differences from the published code:

- The published mini-batch term pairs the images of one GPU only (its gather is commented out); here the
  partners are the global batch (``gather=False`` gives the published per-process pairs).
- The published term keeps ``~2 * B_local * B_global * N^2`` floats for backward (N = 8192 pixels at 1/8 of a
  512x1024 crop: 8 GiB per GPU of 4 images, 128 GiB for one GPU of 16); here the relations are computed in blocks
  of ``chunk_rows`` anchor pixels and recomputed in backward, so the term keeps ``~3 * B_global * chunk_rows * N``
  (0.75 GiB for ``B_global = 16`` and 512 rows) with the same value and gradient (``benchmarks/cirkd_memory.py``).
- Pixel queues are true ring buffers (entry ``(ptr + r) mod size``); the published code writes the last ``K``
  slots and resets the pointer when a write would pass the end. Queues never grow past their size either way.
- The pixel queue of class ``c`` receives pixels of class ``c``: per image, a uniform random subset of at
  most ``pixels_per_update`` (16) of the valid pixels labelled ``c`` (chosen with one sort per image, not a
  loop over classes). The published enqueue draws ``K = min(n_c, 16)`` random indices below ``n_c`` (the
  number of pixels of class ``c`` in the image) and reads them as positions in the whole flattened feature
  map, not among the class's pixels: under label ``c`` it stores random pixels of the first ``n_c`` positions
  in raster order (the top rows of the map) whatever their label, void included. We enqueue the class's own
  pixels deliberately, so that each class's queue holds embeddings of that class. The memory losses do not
  use the keys' labels, so the difference is which teacher embeddings serve as keys (published: pixels from
  the top of the map, the more so the smaller the class). Region queues are the same in both (the normalised
  mean of the class's pixels).
- A batch without valid pixels gives memory losses of exactly 0 with a zero gradient (the published code
  returns NaN there); enqueuing happens only in training mode.
- The student's feature is resized bilinearly (``align_corners=True``) to the teacher's resolution when they
  differ; labels are sampled (nearest) to the teacher's feature resolution.
- Queue size in memory and checkpoints is ``C * (20000 + 2000) * D * 4`` bytes for ``D`` teacher channels
  (``D = 512`` in the published decoder feature: 0.86 GB for 19 classes); the encoder's last stage of a
  ResNet-101 has ``D = 2048``, so prefer a narrower feature or smaller queues.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rdd_lightning.losses._precision import fp32_scope
from rdd_lightning.losses._shapes import check_pair, labels_at, resize

__all__ = [
    "CIRKDMemory",
    "gather_across_processes",
    "memory_contrast_loss",
    "minibatch_pixel_relation_loss",
]


# ------------------------------------------------------------------------------------------ gathering
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(tensor: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenate every process's ``tensor`` along dim 0 (sizes along dim 0 may differ). No autograd."""
    world = dist.get_world_size()
    local = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes_t = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes_t, local)
    sizes = [int(s.item()) for s in sizes_t]
    padded = tensor.detach().contiguous()
    if padded.shape[0] < max(sizes):
        filler = padded.new_zeros((max(sizes) - padded.shape[0], *padded.shape[1:]))
        padded = torch.cat([padded, filler])
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes, strict=True)]), sizes


class _GatherKeepLocalGrad(torch.autograd.Function):
    """all_gather whose backward returns, for the local part, the sum over processes of its gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        gathered, sizes = _all_gather(tensor)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_across_processes(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` along dim 0 in rank order; a no-op without torch.distributed.

    Args:
        tensor: ``[b, ...]`` local tensor; ``b`` may differ between processes, the other dims may not.

    Returns:
        ``[sum of b, ...]``; ``tensor`` itself when ``torch.distributed`` is unavailable, not initialised, or
        has one process. When ``tensor`` requires grad, the local slice of the result carries it: the backward
        hands the local part the sum of the gradients every process's loss sent to that part (one all-reduce
        of the gathered gradient), so losses that every process computes over the global batch train as if one
        process held it. Every process must call this the same number of times (it is a collective).
    """
    if not _distributed():
        return tensor
    if tensor.requires_grad and torch.is_grad_enabled():
        return _GatherKeepLocalGrad.apply(tensor)
    with torch.no_grad():
        return _all_gather(tensor)[0]


# -------------------------------------------------------------------------------------- mini-batch term
def _relation_kl_sum(
    s_rows: Tensor, s_all: Tensor, t_rows: Tensor, t_all: Tensor, temperature: float
) -> Tensor:
    """``sum_j sum_rows KL(softmax(t_rows t_j^T / tau) || softmax(s_rows s_j^T / tau))`` over the partners ``j``.

    ``s_rows [R, Cs]`` / ``t_rows [R, Ct]``: some pixels (rows) of one anchor image; ``s_all [Bg, N, Cs]`` /
    ``t_all [Bg, N, Ct]``: every partner image. Builds ``[Bg, R, N]`` similarities (the softmax runs over each
    partner's ``N`` pixels); returns a 0-dim float32 sum (nats).
    """
    with torch.no_grad():
        log_pt = torch.log_softmax(torch.matmul(t_rows, t_all.transpose(1, 2)) / temperature, dim=-1)
    log_ps = torch.log_softmax(torch.matmul(s_rows, s_all.transpose(1, 2)) / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum()


def minibatch_pixel_relation_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    temperature: float = 0.1,
    pool_size: int = 1,
    gather: bool = True,
    chunk_rows: int | None = 512,
) -> Tensor:
    """CIRKD mini-batch pixel-to-pixel relation loss over the (global) batch.

    Args:
        student_feature: ``[B, Cs, hs, ws]`` student feature (differentiable); resized bilinearly
            (``align_corners=True``) to the teacher's ``(h, w)`` if it differs.
        teacher_feature: ``[B, Ct, h, w]`` teacher feature (detached); ``Ct`` may differ from ``Cs``.
        temperature: relation softmax temperature ``tau`` (0.1).
        pool_size: average-pool both features with this window first (``ceil_mode=True``; 1 = none, as in the
            current CIRKD code; an earlier version pooled ``2x2``).
        gather: pair each local image with every image of the global batch under ``torch.distributed``
            (default); ``False`` pairs the local images only.
        chunk_rows: compute the relations of at most this many anchor pixels at a time and recompute them in
            the backward pass (activation checkpointing), so the term keeps ``~3 * B_global * chunk_rows * N``
            floats instead of ``2 * B * B_global * N^2``; the value and the gradient are the same up to float
            summation order. ``None`` builds each anchor image's ``[B_global, N, N]`` relations whole and keeps
            them for backward (CIRKD's memory profile).

    Returns:
        0-dim float32 loss (nats), ``1 / (B * B_global)`` times the sum over pairs of the row-averaged KL.
        Zero when the student's embeddings equal the teacher's (``N = h*w / pool_size^2``).
    """
    check_pair(student_feature, teacher_feature, same_channels=False, what="features")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if int(pool_size) < 1:
        raise ValueError(f"pool_size={pool_size!r} must be an integer >= 1")
    if chunk_rows is not None and int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows={chunk_rows!r} must be an integer >= 1 or None")
    with fp32_scope(student_feature.device):
        s = resize(student_feature.float(), teacher_feature.shape[-2:])
        t = teacher_feature.detach().float()
        if pool_size > 1:
            s = F.avg_pool2d(s, pool_size, stride=pool_size, ceil_mode=True)
            t = F.avg_pool2d(t, pool_size, stride=pool_size, ceil_mode=True)
        s = F.normalize(s.flatten(2), dim=1).transpose(1, 2)  # [B, N, Cs]
        t = F.normalize(t.flatten(2), dim=1).transpose(1, 2)  # [B, N, Ct]
        s_all = gather_across_processes(s) if gather else s  # [Bg, N, Cs]
        t_all = gather_across_processes(t) if gather else t
        n = s.shape[1]
        rows = n if chunk_rows is None else int(chunk_rows)
        recompute = chunk_rows is not None and torch.is_grad_enabled() and s.requires_grad
        total = s.new_zeros(())
        for i in range(s.shape[0]):
            for start in range(0, n, rows):
                block = (s[i, start : start + rows], s_all, t[i, start : start + rows], t_all, temperature)
                if recompute:
                    total = total + checkpoint(_relation_kl_sum, *block, use_reentrant=False)
                else:
                    total = total + _relation_kl_sum(*block)
        return total / (s.shape[0] * s_all.shape[0] * n)


# ------------------------------------------------------------------------------------------ memory terms
def memory_contrast_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    keys: Tensor,
    *,
    temperature: float = 0.1,
    kd_temperature: float = 1.0,
) -> Tensor:
    """KL between the teacher's and the student's similarity distributions over memory keys.

    Args:
        student_embeddings: ``[N, D]`` student pixel embeddings (differentiable, L2-normalised by the caller).
        teacher_embeddings: ``[N, D]`` teacher pixel embeddings of the same pixels (detached).
        keys: ``[M, D]`` memory keys (teacher embeddings from the queues).
        temperature: contrast temperature ``tau`` (0.1) dividing the similarities.
        kd_temperature: softening ``T_kd`` of the KL (1); the result is multiplied by ``T_kd^2``.

    Returns:
        0-dim float32 loss (nats), averaged over the ``N`` pixels; 0 (with a zero gradient) for ``N = 0``.
    """
    if student_embeddings.dim() != 2 or teacher_embeddings.shape != student_embeddings.shape:
        raise ValueError(
            f"student and teacher embeddings must both be [N, D]; got {tuple(student_embeddings.shape)} and "
            f"{tuple(teacher_embeddings.shape)}"
        )
    if keys.dim() != 2 or keys.shape[1] != student_embeddings.shape[1]:
        raise ValueError(f"keys must be [M, {student_embeddings.shape[1]}]; got {tuple(keys.shape)}")
    with fp32_scope(student_embeddings.device):
        s = student_embeddings.float()
        if s.shape[0] == 0:
            return s.sum() * 0.0
        k = keys.detach().float().t()
        scale = 1.0 / (temperature * kd_temperature)
        with torch.no_grad():
            log_pt = torch.log_softmax((teacher_embeddings.detach().float() @ k) * scale, dim=1)
        log_ps = torch.log_softmax((s @ k) * scale, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum() / s.shape[0]
        return kl * (kd_temperature * kd_temperature)


class CIRKDMemory(nn.Module):
    """CIRKD's memory terms: a student projection head and per-class queues of teacher embeddings.

    The queues are buffers (saved in checkpoints, moved with ``.to()``): ``pixel_queue [C, P, D]`` with
    ``pixel_queue_ptr [C]`` and ``region_queue [C, R, D]`` with ``region_queue_ptr [C]``, initialised with
    random unit vectors as published. The projection head ``1x1 conv -> BN -> ReLU -> 1x1 conv``
    (``Cs -> D -> D``) trains with the student and runs in the caller's precision; everything else is float32.

    Args:
        num_classes: ``C``.
        student_channels: ``Cs`` of the student feature.
        teacher_channels: ``D`` of the teacher feature (the embedding width).
        pixel_memory_size: ``P``, pixel-queue entries per class (20000).
        region_memory_size: ``R``, region-queue entries per class (2000).
        pixel_contrast_size: pixel keys sampled per step in total (4096; ``// C + 1`` per class).
        region_contrast_size: region keys sampled per step in total (1024; ``// C + 1`` per class).
        pixels_per_update: at most this many pixels of each class and image are enqueued per step (16).
        temperature: contrast temperature ``tau`` (0.1).
        kd_temperature: KL softening ``T_kd`` (1).
        ignore_index: void label (255); any label outside ``[0, C)`` is void.
    """

    def __init__(
        self,
        num_classes: int,
        student_channels: int,
        teacher_channels: int,
        *,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int = 4096,
        region_contrast_size: int = 1024,
        pixels_per_update: int = 16,
        temperature: float = 0.1,
        kd_temperature: float = 1.0,
        ignore_index: int = 255,
    ):
        super().__init__()
        sizes = {
            "num_classes": num_classes,
            "student_channels": student_channels,
            "teacher_channels": teacher_channels,
            "pixel_memory_size": pixel_memory_size,
            "region_memory_size": region_memory_size,
            "pixel_contrast_size": pixel_contrast_size,
            "region_contrast_size": region_contrast_size,
            "pixels_per_update": pixels_per_update,
        }
        for name, value in sizes.items():
            if int(value) < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not (temperature > 0 and kd_temperature > 0):
            raise ValueError(f"temperatures must be > 0; got {temperature=}, {kd_temperature=}")
        self.num_classes, self.student_channels = int(num_classes), int(student_channels)
        self.teacher_channels = int(teacher_channels)
        self.pixel_contrast_size = int(pixel_contrast_size)
        self.region_contrast_size = int(region_contrast_size)
        self.pixels_per_update = int(pixels_per_update)
        self.temperature, self.kd_temperature = float(temperature), float(kd_temperature)
        self.ignore_index = int(ignore_index)
        dim = self.teacher_channels
        self.projector = nn.Sequential(
            nn.Conv2d(student_channels, dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, kernel_size=1, bias=False),
        )
        queue_shape = (self.num_classes, int(pixel_memory_size), dim)
        self.register_buffer("pixel_queue", F.normalize(torch.randn(queue_shape), dim=2))
        self.register_buffer("pixel_queue_ptr", torch.zeros(self.num_classes, dtype=torch.long))
        queue_shape = (self.num_classes, int(region_memory_size), dim)
        self.register_buffer("region_queue", F.normalize(torch.randn(queue_shape), dim=2))
        self.register_buffer("region_queue_ptr", torch.zeros(self.num_classes, dtype=torch.long))

    @property
    def pixel_memory_size(self) -> int:
        return int(self.pixel_queue.shape[1])

    @property
    def region_memory_size(self) -> int:
        return int(self.region_queue.shape[1])

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes}, student={self.student_channels}, teacher={self.teacher_channels}, "
            f"pixel_memory={self.pixel_memory_size}, region_memory={self.region_memory_size}"
        )

    def embed_student(self, student_feature: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Projected, L2-normalised student embeddings ``[B, D, h, w]`` (float32), resized to ``size``."""
        if student_feature.dim() != 4 or student_feature.shape[1] != self.student_channels:
            raise ValueError(
                f"student feature must be [B, {self.student_channels}, h, w]; "
                f"got {tuple(student_feature.shape)}"
            )
        projected = self.projector(student_feature)
        with fp32_scope(student_feature.device):
            projected = projected.float()
            if size is not None:
                projected = resize(projected, size)
            return F.normalize(projected, dim=1)

    @torch.no_grad()
    def enqueue(self, teacher_embeddings: Tensor, labels: Tensor) -> None:
        """Push the global batch's teacher embeddings into the queues (a collective under torch.distributed).

        For every image and every class present: the normalised mean embedding of the class's pixels goes to
        the class's region queue (one entry), and a uniform random subset of at most ``pixels_per_update`` of
        the class's own pixels goes to its pixel queue (the published code takes pixels of the map's top rows,
        whatever their label; see the module notes). Both queues are ring buffers: the pointer advances by the
        number of entries written, modulo the queue size.

        Args:
            teacher_embeddings: ``[B, D, h, w]`` L2-normalised teacher embeddings.
            labels: ``int [B, h, w]`` labels at the embeddings' resolution.
        """
        feats = gather_across_processes(teacher_embeddings.detach().float())
        labels = gather_across_processes(labels.long())
        num_classes = self.num_classes
        pixel_size, region_size = self.pixel_memory_size, self.region_memory_size
        per_update = min(self.pixels_per_update, pixel_size)
        for b in range(feats.shape[0]):
            y = labels[b].reshape(-1)
            keep = (y >= 0) & (y < num_classes) & (y != self.ignore_index)
            f = feats[b].reshape(feats.shape[1], -1).t()[keep]  # [n, D]
            y = y[keep]
            if y.numel() == 0:
                continue
            counts = torch.bincount(y, minlength=num_classes)  # [C]
            # region queue: one normalised class-mean per class present
            sums = torch.zeros(num_classes, f.shape[1], device=f.device, dtype=f.dtype).index_add_(0, y, f)
            present = torch.nonzero(counts > 0).squeeze(1)
            means = F.normalize(sums[present] / counts[present, None].to(f.dtype), dim=1)
            self.region_queue[present, self.region_queue_ptr[present]] = means
            self.region_queue_ptr[present] = (self.region_queue_ptr[present] + 1) % region_size
            # pixel queue: a random subset of each class's pixels (sort by class, random order within it)
            order = torch.argsort(y.double() + torch.rand(y.shape, device=y.device, dtype=torch.float64))
            sorted_y = y[order]
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(y.numel(), device=y.device) - starts[sorted_y]
            taken = counts.clamp(max=per_update)
            chosen = rank < taken[sorted_y]
            cls, rank = sorted_y[chosen], rank[chosen]
            slots = (self.pixel_queue_ptr[cls] + rank) % pixel_size
            self.pixel_queue[cls, slots] = F.normalize(f[order[chosen]], dim=1)
            self.pixel_queue_ptr.add_(taken).remainder_(pixel_size)

    def sample_keys(self) -> tuple[Tensor, Tensor]:
        """Random keys ``(pixel_keys [C*n_p, D], region_keys [C*n_r, D])``, ``n = min(size // C + 1, queue)``.

        One random set of queue slots is drawn per queue and used for every class, as published.
        """

        def sample(queue: Tensor, total: int) -> Tensor:
            classes, length, dim = queue.shape
            per_class = min(total // classes + 1, length)
            index = torch.randperm(length, device=queue.device)[:per_class]
            return queue[:, index].reshape(classes * per_class, dim)

        pixel_keys = sample(self.pixel_queue, self.pixel_contrast_size)
        return pixel_keys, sample(self.region_queue, self.region_contrast_size)

    def forward(
        self, student_feature: Tensor, teacher_feature: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Memory pixel-to-pixel and pixel-to-region losses of one batch, enqueued first in training mode.

        Args:
            student_feature: ``[B, Cs, hs, ws]`` student feature (differentiable; projected, then resized
                bilinearly to the teacher's ``(h, w)`` if it differs).
            teacher_feature: ``[B, D, h, w]`` teacher feature (detached).
            target: ``int [B, H, W]`` labels (sampled, nearest, to ``(h, w)``).

        Returns:
            ``(pixel_loss, region_loss)``: 0-dim float32 losses (nats) over the local batch's valid pixels;
            both exactly 0 (zero gradient) when no pixel is valid.
        """
        check_pair(student_feature, teacher_feature, same_channels=False, what="features")
        if teacher_feature.shape[1] != self.teacher_channels:
            raise ValueError(
                f"teacher feature must be [B, {self.teacher_channels}, h, w]; "
                f"got {tuple(teacher_feature.shape)}"
            )
        size = (int(teacher_feature.shape[-2]), int(teacher_feature.shape[-1]))
        s = self.embed_student(student_feature, size)
        with fp32_scope(teacher_feature.device):
            t = F.normalize(teacher_feature.detach().float(), dim=1)
            labels = labels_at(target, size)
            if self.training:
                self.enqueue(t, labels)
            y = labels.reshape(-1)
            valid = (y >= 0) & (y < self.num_classes) & (y != self.ignore_index)
            s_pixels = s.movedim(1, -1).reshape(-1, self.teacher_channels)[valid]
            t_pixels = t.movedim(1, -1).reshape(-1, self.teacher_channels)[valid]
            if s_pixels.shape[0] == 0:
                zero = s.sum() * 0.0
                return zero, zero.clone()
            pixel_keys, region_keys = self.sample_keys()
            options = {"temperature": self.temperature, "kd_temperature": self.kd_temperature}
            pixel = memory_contrast_loss(s_pixels, t_pixels, pixel_keys, **options)
            region = memory_contrast_loss(s_pixels, t_pixels, region_keys, **options)
            return pixel, region

"""Relative Difficulty Distillation (RDD): the task-loss re-weighting math, as plain torch functions.

This module is the normative implementation of ``RDD_SPEC.md`` (stage 1 "TFE-RDD" and stage 2 "TSE-RDD").
It imports neither Lightning nor Hydra; :class:`rdd_lightning.module.DistillationModule` calls it.

Conventions used in every docstring below:

- ``B`` batch size, ``C`` number of classes, ``h, w`` a network's own logit resolution (1/8 of the input for
  dilated DeepLabV3/PSPNet), ``H, W`` the label resolution.
- Logits are unnormalised scores ``[B, C, h, w]`` of any floating dtype (fp32, fp16, bf16). Labels are integer
  ``[B, H, W]`` with ``ignore_index`` (255) marking void pixels.
- ``up(x)`` is a bilinear resize to ``(H, W)`` with ``align_corners=True`` (skipped when the size already
  matches).
- Cross-entropies and KL divergences are in nats; probabilities and weights are unitless in ``[0, 1]``.
- All softmax / log-softmax work is done in float32 with autocast disabled, so the results are float32 even
  when called under ``torch.autocast`` with half-precision logits.
- Teacher-derived quantities (TFE weights, hard-pixel masks) are computed under ``torch.no_grad()``: no
  gradient ever flows into the teacher logits nor through a weight or a mask. Only the student's
  cross-entropy is differentiable.

Distributed training: ``min_kept`` (the OHEM minimum of hard pixels, see :func:`hard_pixel_threshold`) is
applied by each process to its *own* batch, exactly as the authors' per-GPU code did; nothing is gathered
across processes. With 4 processes of batch 4, each process keeps at least ``min_kept`` pixels of its 4 images.

Efficiency: each student head's logits are upsampled once and log-softmaxed once; the same log-softmax gives
its per-pixel cross-entropy and (detached) its ground-truth-class confidence ``q = exp(-ce)`` for the hard
mask. Teacher confidences are computed under ``no_grad`` with a cheaper exp-normalise of max-shifted logits
(see :func:`pixel_confidence`), before the student's graph is built, so they do not raise the peak memory. The
OHEM threshold search counts ``q <= threshold`` first and only runs a k-th-value selection
(``torch.kthvalue``, no full sort) when that count is below ``k``. Each hard mask costs one host sync (two on
the k-th-value path); ``tse_task_loss`` adds one for the number of valid pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rdd_lightning.losses._precision import fp32_scope as _fp32_scope

__all__ = [
    "CITYSCAPES_CLASS_WEIGHTS",
    "NAMED_CLASS_WEIGHTS",
    "KL_DIRECTIONS",
    "CONFIDENCES",
    "MASK_MODES",
    "NORMALIZATIONS",
    "upsample_logits",
    "pixel_confidence",
    "hard_pixel_threshold",
    "hard_mask_from_confidence",
    "hard_pixel_mask",
    "combine_hard_masks",
    "resolve_class_weight",
    "tfe_weight",
    "tfe_task_loss",
    "tse_task_loss",
]

#: Per-class cross-entropy weights the authors used for Cityscapes' 19 train classes (TSE stage only).
CITYSCAPES_CLASS_WEIGHTS: tuple[float, ...] = (
    0.8373,
    0.918,
    0.866,
    1.0345,
    1.0166,
    0.9969,
    0.9754,
    1.0489,
    0.8786,
    1.0023,
    0.9539,
    0.9843,
    1.1116,
    0.9037,
    1.0865,
    1.0955,
    1.0865,
    1.1529,
    1.0507,
)

#: Class-weight presets that ``class_weight="<name>"`` resolves to.
NAMED_CLASS_WEIGHTS: dict[str, tuple[float, ...]] = {"cityscapes": CITYSCAPES_CLASS_WEIGHTS}

KL_DIRECTIONS = ("aux_to_main", "main_to_aux")
CONFIDENCES = ("gt_prob", "max_prob")
MASK_MODES = ("xor", "or", "and", "student")
NORMALIZATIONS = ("selected", "all_pixels")

KLDirection = Literal["aux_to_main", "main_to_aux"]
Confidence = Literal["gt_prob", "max_prob"]
MaskMode = Literal["xor", "or", "and", "student"]
Normalization = Literal["selected", "all_pixels"]
ClassWeight = None | str | Sequence[float] | Tensor

# Below this softmax normaliser (sum of exp of max-shifted logits) ``pixel_confidence`` uses the exact path.
_MIN_NORMALISER = 1e-30


# ----------------------------------------------------------------------------------------------- helpers
def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the argument, the bad value and the allowed values."""
    if value not in allowed:
        raise ValueError(
            f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}"
        )


def _check_logits(name: str, logits: Tensor, target: Tensor | None = None) -> None:
    """Check that ``logits`` is ``[B, C, h, w]`` floating and matches the batch size of ``target [B, H, W]``."""
    if logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(
            f"{name} must be a floating tensor of shape [B, C, h, w]; got dtype {logits.dtype}, "
            f"shape {tuple(logits.shape)}"
        )
    if target is not None and logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"{name} has batch size {logits.shape[0]} but target has {target.shape[0]} "
            f"(logits {tuple(logits.shape)}, target {tuple(target.shape)})"
        )


def _check_target(target: Tensor) -> None:
    """Check that ``target`` is an integer label map ``[B, H, W]``."""
    if target.dim() != 3 or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(
            f"target must be an integer label tensor of shape [B, H, W]; got dtype {target.dtype}, "
            f"shape {tuple(target.shape)}"
        )


def _check_min_kept(min_kept: int) -> int:
    """Return ``min_kept`` as an int; integral floats (``1e5`` from a config) are accepted."""
    is_number = isinstance(min_kept, int | float) and not isinstance(min_kept, bool)
    if not is_number or not 0 <= min_kept < float("inf") or float(min_kept) != int(min_kept):
        raise ValueError(f"min_kept={min_kept!r} must be an integer >= 0 (0: no minimum of hard pixels)")
    return int(min_kept)


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """``up(logits)``: bilinear resize (``align_corners=True``) of ``[B, C, h, w]`` to ``[B, C, H, W]``, float32.

    Args:
        logits: ``[B, C, h, w]`` scores (or any per-pixel maps), any floating dtype.
        size: ``(H, W)`` target spatial size, usually the label size.

    Returns:
        ``[B, C, H, W]`` float32 tensor; ``logits.float()`` itself when the size already matches.
    """
    size = (int(size[0]), int(size[1]))
    logits = logits.float()
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


# ------------------------------------------------------------------------------------ per-pixel quantities
def _log_probs_ce(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """One head: ``log softmax(up(logits))`` ``[B, C, H, W]`` and per-pixel CE ``[B, H, W]`` (0 at ignored).

    Call inside :func:`~rdd_lightning.losses._precision.fp32_scope`. Differentiable w.r.t. ``logits``.
    """
    log_probs = torch.log_softmax(upsample_logits(logits, target.shape[-2:]), dim=1)
    ce = F.nll_loss(log_probs, target, reduction="none", ignore_index=ignore_index)
    return log_probs, ce


def _confidence_from_log_probs(
    log_probs: Tensor, ce: Tensor, valid: Tensor, confidence: Confidence
) -> Tensor:
    """Detached confidence ``q`` ``[B, H, W]`` of a head whose log-probs / CE are already computed.

    ``gt_prob``: ``q = exp(-ce)``, the ground-truth-class probability (``ce = 0`` at ignored pixels, so
    ``q = 1`` there). ``max_prob``: ``q = exp(max_c log_probs)``, set to 1 at ignored pixels.
    """
    with torch.no_grad():
        if confidence == "gt_prob":
            return ce.detach().neg().exp_()
        return torch.where(valid, log_probs.detach().amax(dim=1).exp_(), 1.0)


def _confidence_no_grad(
    logits: Tensor,
    target: Tensor,
    valid: Tensor,
    safe_target: Tensor,
    confidence: Confidence,
    ignore_index: int,
) -> Tensor:
    """Detached ``q`` ``[B, H, W]`` of a head that needs no gradient (see :func:`pixel_confidence`).

    ``safe_target`` is ``target`` with ignored pixels replaced by class 0 (a valid gather index). Works one
    image at a time in a single reused ``[1, C, H, W]`` float32 buffer: this bounds the temporary memory and,
    on CPU, avoids page-faulting a fresh full-batch buffer on every call.
    """
    with torch.no_grad(), _fp32_scope(logits.device):
        shifted = logits.detach().float()
        shifted = shifted - shifted.amax(dim=1, keepdim=True)  # [B,C,h,w], max 0 per logit pixel
        batch, num_classes = shifted.shape[:2]
        height, width = (int(n) for n in target.shape[-2:])
        same_size = tuple(shifted.shape[-2:]) == (height, width)
        buffer = shifted.new_empty((1, num_classes, height, width))
        numerator = shifted.new_empty((batch, height, width))
        normaliser = shifted.new_empty((batch, height, width))
        for b in range(batch):
            if same_size:
                buffer.copy_(shifted[b : b + 1])
            else:  # up(): bilinear, align_corners=True, written into the reused buffer
                torch.ops.aten.upsample_bilinear2d.out(
                    shifted[b : b + 1], [height, width], True, None, None, out=buffer
                )
            buffer.exp_()  # values in [0, 1]: the upsampled shifted logits are <= 0
            torch.sum(buffer, dim=1, out=normaliser[b : b + 1])
            if confidence == "gt_prob":
                torch.gather(
                    buffer, 1, safe_target[b : b + 1].unsqueeze(1), out=numerator[b : b + 1].unsqueeze(1)
                )
            else:
                torch.amax(buffer, dim=1, out=numerator[b : b + 1])
        del buffer, shifted
        if bool(normaliser.amin() < _MIN_NORMALISER):  # extreme logit ranges: exact, slower path
            log_probs, ce = _log_probs_ce(logits.detach(), target, ignore_index)
            return _confidence_from_log_probs(log_probs, ce, valid, confidence)
        return numerator.div_(normaliser).masked_fill_(~valid, 1.0)


def pixel_confidence(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = 255,
    confidence: Confidence = "gt_prob",
) -> Tensor:
    """Per-pixel confidence ``q`` of one head at the label resolution, without gradient.

    ``q = softmax(up(logits))[y]`` (``confidence="gt_prob"``, the authors' code) or
    ``q = max_c softmax(up(logits))_c`` (``"max_prob"``); ``q = 1`` at ignored pixels.

    Computed without a full-resolution log-softmax: each low-resolution logit vector is first shifted by its
    own maximum. Bilinear interpolation is a convex combination of neighbouring vectors, so this only shifts
    every upsampled vector by a per-pixel constant, which softmax ignores; the upsampled shifted logits are
    ``<= 0`` and are exponentiated in place without overflow: ``q = e_y / sum_c e_c`` with
    ``e = exp(up(z - max_c z))``. Should ``sum_c e_c`` underflow anywhere (logit ranges of more than ~70 nats
    between neighbouring logit pixels), the whole batch falls back to ``exp(log_softmax(up(z)))``. Results
    agree with the direct formula to float32 rounding (~1e-6).

    Args:
        logits: ``[B, C, h, w]`` scores, any floating dtype (no gradient is taken).
        target: ``[B, H, W]`` integer labels.
        ignore_index: label value of void pixels.
        confidence: ``"gt_prob"`` or ``"max_prob"``.

    Returns:
        ``[B, H, W]`` float32 probabilities in ``[0, 1]``, detached.
    """
    _check_choice("confidence", confidence, CONFIDENCES)
    _check_target(target)
    _check_logits("logits", logits, target)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    return _confidence_no_grad(logits, target, valid, safe_target, confidence, ignore_index)


# -------------------------------------------------------------------------------------- hard-pixel masks
def _float32(x: float) -> float:
    """``x`` rounded to float32, the precision thresholds are compared in."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def _hard_mask(
    confidence: Tensor, valid: Tensor, num_valid: int, threshold: float, min_kept: int
) -> tuple[Tensor, float]:
    """Hard mask ``valid & (q <= tau)`` ``[B, H, W]`` and ``tau`` (float); see :func:`hard_pixel_threshold`.

    ``confidence`` must hold 1 at ignored pixels and ``num_valid = #valid``. Because ``q <= 1`` everywhere,
    a ``tau < 1`` already excludes ignored pixels and the ``& valid`` is skipped. One host sync (the count);
    a second one only on the k-th-value path.
    """
    with torch.no_grad():
        threshold = _float32(threshold)
        below = confidence <= threshold
        if threshold >= 1.0:
            below &= valid
        k = min(int(min_kept), num_valid)
        if k > 0 and int(torch.count_nonzero(below)) < k:
            # fewer than k pixels under the fixed threshold: tau = k-th smallest q (> threshold). Ignored
            # pixels hold q = 1 >= any valid q, so with k <= #valid this is the k-th smallest valid q.
            tau = float(torch.kthvalue(confidence.reshape(-1), k).values)
            below = confidence <= tau
            if tau >= 1.0:
                below &= valid
            return below, tau
        return below, threshold


def hard_pixel_threshold(
    confidence: Tensor, valid: Tensor, *, threshold: float = 0.7, min_kept: int = 100000
) -> Tensor:
    """OHEM threshold ``tau = max(threshold, k-th smallest q)`` with ``k = min(min_kept, #valid)``.

    Args:
        confidence: ``[B, H, W]`` (any shape) float confidences ``q`` in ``[0, 1]``, **1 at ignored pixels**.
        valid: bool tensor of the same shape, ``True`` at non-ignored pixels.
        threshold: fixed probability threshold (default 0.7), compared in float32.
        min_kept: minimum number of hard pixels over the whole tensor (the per-process batch under DDP).
            ``min_kept = 0`` means no minimum: ``tau = threshold`` (as in the authors' code).

    Returns:
        0-dim float32 tensor ``tau`` on ``confidence``'s device. When no pixel is valid, ``tau = threshold``
        (the mask ``valid & (q <= tau)`` is then empty anyway).

    No full sort: the number of valid pixels with ``q <= threshold`` is counted first; if it reaches ``k`` the
    k-th smallest ``q`` is ``<= threshold`` and ``tau = threshold``. Only otherwise is ``torch.kthvalue`` run.
    """
    num_valid = int(torch.count_nonzero(valid))
    _, tau = _hard_mask(confidence, valid, num_valid, threshold, min_kept)
    return torch.tensor(tau, dtype=torch.float32, device=confidence.device)


def hard_mask_from_confidence(
    confidence: Tensor, valid: Tensor, *, threshold: float = 0.7, min_kept: int = 100000
) -> Tensor:
    """Hard pixels ``valid & (q <= tau)`` with ``tau`` from :func:`hard_pixel_threshold`.

    Args:
        confidence: ``[B, H, W]`` float ``q``, **1 at ignored pixels**.
        valid: ``[B, H, W]`` bool, ``True`` at non-ignored pixels.
        threshold, min_kept: see :func:`hard_pixel_threshold`.

    Returns:
        ``[B, H, W]`` bool mask; empty when no pixel is valid.
    """
    num_valid = int(torch.count_nonzero(valid))
    return _hard_mask(confidence, valid, num_valid, threshold, min_kept)[0]


def hard_pixel_mask(
    logits: Tensor,
    target: Tensor,
    *,
    threshold: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = 255,
    confidence: Confidence = "gt_prob",
) -> Tensor:
    """Hard-pixel (OHEM) mask of one head, at the label resolution, without gradient.

    ``q = softmax(up(logits))[y]`` (or the max class probability with ``confidence="max_prob"``), ``q = 1``
    at ignored pixels; ``k = min(min_kept, #valid)`` over the whole batch; ``tau = max(threshold, k-th
    smallest q)``; ``hard = valid & (q <= tau)``. No valid pixel gives an empty mask. Under DDP each process
    applies ``min_kept`` to its own batch.

    Args:
        logits: ``[B, C, h, w]`` scores of one head, any floating dtype.
        target: ``[B, H, W]`` integer labels.
        threshold: probability threshold (default 0.7), compared in float32.
        min_kept: minimum number of hard pixels in the batch (default 100000; 0: no minimum).
        ignore_index: label value of void pixels.
        confidence: ``"gt_prob"`` (authors' code) or ``"max_prob"`` (paper's figure).

    Returns:
        ``[B, H, W]`` bool tensor, ``True`` at hard pixels.
    """
    min_kept = _check_min_kept(min_kept)
    q = pixel_confidence(logits, target, ignore_index=ignore_index, confidence=confidence)
    return hard_mask_from_confidence(q, target != ignore_index, threshold=threshold, min_kept=min_kept)


def combine_hard_masks(student_hard: Tensor, teacher_hard: Tensor | None, mode: MaskMode = "xor") -> Tensor:
    """Combine the student's and teacher's hard masks ``[B, H, W]`` (bool) into the TSE selection ``M``.

    ``xor`` (default): hard for exactly one of them; ``or``: for either; ``and``: for both; ``student``: the
    student's mask alone (plain OHEM; ``teacher_hard`` may then be ``None``).

    Returns:
        ``[B, H, W]`` bool tensor.
    """
    _check_choice("mode", mode, MASK_MODES)
    if mode == "student":
        return student_hard
    if teacher_hard is None:
        raise ValueError(f"mode={mode!r} needs the teacher's hard mask; only mode='student' works without it")
    if mode == "xor":
        return student_hard ^ teacher_hard
    if mode == "or":
        return student_hard | teacher_hard
    return student_hard & teacher_hard


# --------------------------------------------------------------------------------- class-weighted CE
def resolve_class_weight(
    class_weight: ClassWeight, num_classes: int, device: torch.device | str | None = None
) -> Tensor | None:
    """Turn a ``class_weight`` setting into a float32 ``[C]`` tensor on ``device`` (or ``None``).

    Args:
        class_weight: ``None`` (no weights), a preset name from :data:`NAMED_CLASS_WEIGHTS` (``"cityscapes"``),
            or a sequence / 1-D tensor of ``C`` non-negative floats.
        num_classes: ``C``, the number of logit channels; the weights must have exactly this length.
        device: where the returned tensor lives.

    Raises:
        ValueError: unknown preset name (the message lists the known ones), wrong length, or negative values.
    """
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        key = class_weight.lower()
        if key not in NAMED_CLASS_WEIGHTS:
            raise ValueError(
                f"class_weight={class_weight!r} is not a known preset; known names: "
                f"{', '.join(map(repr, sorted(NAMED_CLASS_WEIGHTS)))} (or give a list of {num_classes} floats, "
                "or null for no weights)"
            )
        class_weight = NAMED_CLASS_WEIGHTS[key]
    weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device).reshape(-1)
    if weight.numel() != num_classes:
        raise ValueError(
            f"class_weight has {weight.numel()} values but the logits have {num_classes} classes; give exactly "
            f"one weight per class"
        )
    if bool((weight < 0).any()) or not bool(torch.isfinite(weight).all()):
        raise ValueError(f"class_weight must be finite and non-negative; got {weight.tolist()}")
    return weight


def _selected_cross_entropy(
    ce: Tensor,
    target: Tensor,
    selected: Tensor,
    *,
    class_weight: Tensor | None = None,
    normalize: Normalization = "selected",
) -> Tensor:
    """``WCE``: class-weighted cross-entropy over the selected pixels only.

    ``normalize="selected"`` (authors' code, PyTorch's weighted mean): ``sum_{i in M} w_{y_i} ce_i /
    sum_{i in M} w_{y_i}``. ``normalize="all_pixels"`` (paper's Eq. 10): ``sum_{i in M} w_{y_i} ce_i / (B*H*W)``.
    Without class weights ``w = 1``. An empty selection (or a zero weight sum) gives exactly 0 with a zero
    gradient, never NaN.

    Args:
        ce: ``[B, H, W]`` float per-pixel cross-entropy (nats), differentiable.
        target: ``[B, H, W]`` integer labels (only read where ``selected``).
        selected: ``[B, H, W]`` bool selection ``M`` (must exclude ignored pixels).
        class_weight: ``[C]`` float weights or ``None``.
        normalize: ``"selected"`` or ``"all_pixels"``.

    Returns:
        0-dim float tensor (nats).
    """
    _check_choice("normalize", normalize, NORMALIZATIONS)
    selected_ce = torch.where(selected, ce, 0.0)
    if class_weight is None:
        numerator = selected_ce.sum()
        denominator = torch.count_nonzero(selected).to(ce.dtype) if normalize == "selected" else None
    else:
        with torch.no_grad():
            pixel_weight = torch.where(
                selected, class_weight.to(ce.dtype)[torch.where(selected, target, 0)], 0.0
            )
        numerator = (selected_ce * pixel_weight).sum()
        denominator = pixel_weight.sum() if normalize == "selected" else None
    if denominator is None:
        return numerator / ce.numel()
    return numerator / torch.where(denominator > 0, denominator, 1.0)


# --------------------------------------------------------------------------------------------- TFE-RDD
def _head_disagreement(
    teacher_logits: Tensor, teacher_aux_logits: Tensor, kl_direction: KLDirection = "aux_to_main"
) -> Tensor:
    """Per-pixel KL ``u`` between the teacher's auxiliary and main heads at the teacher's logit resolution.

    ``aux_to_main`` (authors' code): ``u = KL(softmax(at) || softmax(zt)) = sum_c p_a (log p_a - log p_z)``.
    ``main_to_aux`` (paper's Eq. 6): ``u = KL(softmax(zt) || softmax(at))``. Clamped at 0 against rounding.

    Args:
        teacher_logits: ``[B, C, h, w]`` main-head scores ``zt``.
        teacher_aux_logits: ``[B, C, h', w']`` aux-head scores ``at``; resized bilinearly (align_corners) to
            ``(h, w)`` if its size differs.
        kl_direction: ``"aux_to_main"`` or ``"main_to_aux"``.

    Returns:
        ``[B, h, w]`` float32 KL in nats (``>= 0``), without gradient.
    """
    _check_choice("kl_direction", kl_direction, KL_DIRECTIONS)
    with torch.no_grad(), _fp32_scope(teacher_logits.device):
        log_main = torch.log_softmax(teacher_logits.float(), dim=1)
        log_aux = torch.log_softmax(upsample_logits(teacher_aux_logits, teacher_logits.shape[-2:]), dim=1)
        if kl_direction == "aux_to_main":
            log_p, log_q = log_aux, log_main
        else:
            log_p, log_q = log_main, log_aux
        return (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min_(0.0)


def _require_teacher_aux(teacher_aux_logits: Tensor | None) -> Tensor:
    if teacher_aux_logits is None:
        raise ValueError(
            "TFE-RDD needs a teacher with an auxiliary head: its difficulty signal is the disagreement between "
            "the teacher's main and auxiliary heads, and teacher_aux_logits is None. Set `teacher.aux_head: true` "
            "(and a teacher checkpoint that has trained aux-head weights), or use TSE-RDD only (switch point 0)."
        )
    return teacher_aux_logits


def tfe_weight(
    teacher_logits: Tensor,
    teacher_aux_logits: Tensor | None,
    size: Sequence[int],
    kl_direction: KLDirection = "aux_to_main",
) -> Tensor:
    """TFE pixel weight ``up(exp(-u))`` at the label resolution, without gradient.

    ``u`` is the teacher's main/aux head disagreement (:func:`_head_disagreement`) computed at the teacher's
    logit resolution; ``w = exp(-u)`` is in ``(0, 1]`` (1 where the heads agree; it underflows to 0 only for
    ``u`` above ~87 nats) and is then bilinearly upsampled (``align_corners=True``) to ``size``.

    Args:
        teacher_logits: ``[B, C, h, w]`` teacher main-head scores.
        teacher_aux_logits: ``[B, C, h, w]`` teacher aux-head scores; ``None`` raises ``ValueError``
            (TFE needs the teacher's aux head, config key ``teacher.aux_head``).
        size: ``(H, W)`` label size.
        kl_direction: ``"aux_to_main"`` (authors' code, default) or ``"main_to_aux"`` (paper's Eq. 6).

    Returns:
        ``[B, H, W]`` float32 weights in ``(0, 1]``.
    """
    _check_choice("kl_direction", kl_direction, KL_DIRECTIONS)
    teacher_aux_logits = _require_teacher_aux(teacher_aux_logits)
    _check_logits("teacher_logits", teacher_logits)
    _check_logits("teacher_aux_logits", teacher_aux_logits, teacher_logits)
    with torch.no_grad(), _fp32_scope(teacher_logits.device):
        weight = torch.exp(-_head_disagreement(teacher_logits, teacher_aux_logits, kl_direction))
        return upsample_logits(weight.unsqueeze(1), size).squeeze(1)


def tfe_task_loss(
    student_logits: Tensor,
    student_aux_logits: Tensor | None,
    teacher_logits: Tensor,
    teacher_aux_logits: Tensor | None,
    target: Tensor,
    *,
    ignore_index: int = 255,
    aux_weight: float = 0.4,
    kl_direction: KLDirection = "aux_to_main",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Stage-1 (TFE-RDD) task loss: teacher-difficulty-weighted cross-entropy of the student.

    ``L = mean over ALL B*H*W pixels of w * (CEpix(zs, y) + aux_weight * CEpix(as, y))`` with
    ``w = tfe_weight(zt, at, (H, W))``. Ignored pixels contribute 0 to the sum but count in the ``B*H*W``
    denominator (authors' code). No class weights in this stage. A student without an aux head
    (``student_aux_logits=None``) simply has no aux term.

    Args:
        student_logits: ``[B, C, hs, ws]`` student main scores ``zs`` (differentiable).
        student_aux_logits: ``[B, C, hs', ws']`` student aux scores ``as`` or ``None``.
        teacher_logits: ``[B, C, ht, wt]`` teacher main scores ``zt`` (treated as constants).
        teacher_aux_logits: ``[B, C, ht, wt]`` teacher aux scores ``at``; ``None`` raises ``ValueError``.
        target: ``[B, H, W]`` integer labels, ``ignore_index`` for void.
        ignore_index: label value of void pixels.
        aux_weight: weight of the student's aux CE (0.4).
        kl_direction: ``"aux_to_main"`` (default, code) or ``"main_to_aux"`` (paper).
        return_stats: also return ``{"tfe_weight_mean": mean of w over valid pixels}`` (0-dim float32,
            detached; 0 when no pixel is valid).

    Returns:
        0-dim float32 loss (nats), or ``(loss, stats)`` when ``return_stats``.
    """
    _check_choice("kl_direction", kl_direction, KL_DIRECTIONS)
    teacher_aux_logits = _require_teacher_aux(teacher_aux_logits)
    _check_target(target)
    _check_logits("student_logits", student_logits, target)
    _check_logits("teacher_logits", teacher_logits, target)
    if student_aux_logits is not None:
        _check_logits("student_aux_logits", student_aux_logits, target)
    size = target.shape[-2:]
    weight = tfe_weight(teacher_logits, teacher_aux_logits, size, kl_direction)  # [B,H,W], no grad
    with _fp32_scope(student_logits.device):
        per_pixel = _log_probs_ce(student_logits, target, ignore_index)[1]
        if student_aux_logits is not None:
            aux_ce = _log_probs_ce(student_aux_logits, target, ignore_index)[1]
            per_pixel = torch.add(per_pixel, aux_ce, alpha=aux_weight)
        loss = (weight * per_pixel).sum() / per_pixel.numel()
    if not return_stats:
        return loss
    with torch.no_grad():
        valid = target != ignore_index
        stats = {"tfe_weight_mean": torch.where(valid, weight, 0.0).sum() / valid.sum().clamp_min(1)}
    return loss, stats


# --------------------------------------------------------------------------------------------- TSE-RDD
def tse_task_loss(
    student_logits: Tensor,
    student_aux_logits: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_aux_logits: Tensor | None,
    target: Tensor,
    *,
    mode: MaskMode = "xor",
    threshold: float = 0.7,
    min_kept: int = 100000,
    class_weight: ClassWeight = None,
    ignore_index: int = 255,
    aux_weight: float = 0.4,
    normalize: Normalization = "selected",
    confidence: Confidence = "gt_prob",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Stage-2 (TSE-RDD) task loss: student cross-entropy on the pixels selected by the relative-difficulty mask.

    ``L = WCE(zs, y on M) + aux_weight * WCE(as, y on M_aux)`` where
    ``M = combine(hard(zs), hard(zt), mode)`` and ``M_aux = combine(hard(as), hard(at), mode)``,
    ``hard`` is :func:`hard_pixel_mask` and ``WCE`` is :func:`_selected_cross_entropy`.

    Aux heads: with no student aux head there is no aux term (the teacher's aux head is then not evaluated).
    If the student has an aux head but the teacher has none, the teacher's **main**-head mask stands in for
    the teacher's side of ``M_aux``. Masks carry no gradient; an empty selection gives exactly 0 (zero
    gradient). ``min_kept`` is applied per process under DDP (see the module docstring).

    Args:
        student_logits: ``[B, C, hs, ws]`` student main scores (differentiable).
        student_aux_logits: ``[B, C, hs', ws']`` student aux scores or ``None``.
        teacher_logits: ``[B, C, ht, wt]`` teacher main scores (constants); may be ``None`` only for
            ``mode="student"``.
        teacher_aux_logits: ``[B, C, ht', wt']`` teacher aux scores or ``None``.
        target: ``[B, H, W]`` integer labels.
        mode: ``"xor"`` (default), ``"or"``, ``"and"`` or ``"student"`` (plain OHEM of the student).
        threshold: OHEM probability threshold (0.7).
        min_kept: OHEM minimum of hard pixels per head over the batch (100000).
        class_weight: ``None``, ``"cityscapes"`` (:data:`CITYSCAPES_CLASS_WEIGHTS`), or ``C`` floats.
        ignore_index: label value of void pixels.
        aux_weight: weight of the aux term (0.4).
        normalize: ``"selected"`` (code: weighted mean over ``M``) or ``"all_pixels"`` (paper: sum / B*H*W).
        confidence: ``"gt_prob"`` (code) or ``"max_prob"`` for the hard masks.
        return_stats: also return detached 0-dim float32 statistics of the main heads (fractions of the
            valid pixels, 0 when none is valid): ``tse_selected_fraction`` (``|M| / #valid``),
            ``tse_student_hard_fraction`` and, unless ``mode="student"``, ``tse_teacher_hard_fraction``.

    Returns:
        0-dim float32 loss (nats), or ``(loss, stats)`` when ``return_stats``.
    """
    _check_choice("mode", mode, MASK_MODES)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    _check_choice("confidence", confidence, CONFIDENCES)
    min_kept = _check_min_kept(min_kept)
    _check_target(target)
    _check_logits("student_logits", student_logits, target)
    use_teacher = mode != "student"
    if use_teacher:
        if teacher_logits is None:
            raise ValueError(
                f"mode={mode!r} needs teacher_logits; only mode='student' works without a teacher"
            )
        _check_logits("teacher_logits", teacher_logits, target)
    has_aux = student_aux_logits is not None
    if has_aux:
        _check_logits("student_aux_logits", student_aux_logits, target)
    if teacher_aux_logits is not None:
        _check_logits("teacher_aux_logits", teacher_aux_logits, target)
    weight = resolve_class_weight(class_weight, student_logits.shape[1], student_logits.device)
    with torch.no_grad():
        valid = target != ignore_index
        num_valid = int(torch.count_nonzero(valid))
        safe_target = torch.where(valid, target, 0)

    def hard(q: Tensor) -> Tensor:
        return _hard_mask(q, valid, num_valid, threshold, min_kept)[0]

    # Teacher masks first (no grad) so their full-resolution temporaries are freed before the student's
    # log-probs are held for backward.
    teacher_hard = teacher_aux_hard = None
    if use_teacher:
        teacher_hard = hard(
            _confidence_no_grad(teacher_logits, target, valid, safe_target, confidence, ignore_index)
        )
        if has_aux:
            if teacher_aux_logits is None:
                teacher_aux_hard = teacher_hard  # documented fallback: the teacher's main mask stands in
            else:
                teacher_aux_hard = hard(
                    _confidence_no_grad(
                        teacher_aux_logits, target, valid, safe_target, confidence, ignore_index
                    )
                )

    with _fp32_scope(student_logits.device):
        log_probs, ce = _log_probs_ce(student_logits, target, ignore_index)
        student_hard = hard(_confidence_from_log_probs(log_probs, ce, valid, confidence))
        del log_probs
        selected = combine_hard_masks(student_hard, teacher_hard, mode)
        loss = _selected_cross_entropy(ce, safe_target, selected, class_weight=weight, normalize=normalize)
        if has_aux:
            log_probs_a, ce_a = _log_probs_ce(student_aux_logits, target, ignore_index)
            aux_hard = hard(_confidence_from_log_probs(log_probs_a, ce_a, valid, confidence))
            del log_probs_a
            selected_aux = combine_hard_masks(aux_hard, teacher_aux_hard, mode)
            aux_loss = _selected_cross_entropy(
                ce_a, safe_target, selected_aux, class_weight=weight, normalize=normalize
            )
            loss = loss + aux_weight * aux_loss
    if not return_stats:
        return loss
    with torch.no_grad():
        denominator = float(max(num_valid, 1))
        stats = {
            "tse_selected_fraction": torch.count_nonzero(selected).float() / denominator,
            "tse_student_hard_fraction": torch.count_nonzero(student_hard).float() / denominator,
        }
        if teacher_hard is not None:
            stats["tse_teacher_hard_fraction"] = torch.count_nonzero(teacher_hard).float() / denominator
    return loss, stats

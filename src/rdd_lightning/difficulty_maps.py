"""Where RDD finds pixels hard: the TFE weights and TSE selections of a student and its teacher, drawn per image.

Three layers, each usable alone:

- :func:`difficulty_maps` computes, for a batch, the predictions of both networks, the stage-1 TFE weight map
  and the stage-2 TSE hard masks with their category map (who finds a pixel hard) and the selection the
  configured mode trains on. The math is :mod:`rdd_lightning.rdd`'s; nothing here re-derives it.
- :func:`render_difficulty_maps` draws one row of panels per image on a :class:`matplotlib.figure.Figure`
  (no pyplot, no global state): image | ground truth | teacher | student | TFE weight | TSE selection.
- :class:`DifficultyMapLogger` does both on fixed validation images every N-th validation and logs the result
  to W&B (``wandb.Image`` with segmentation masks) and/or as PNG files in the run directory.

TSE categories (:data:`CATEGORY_NAMES`): 0 hard for neither network, 1 for the student only, 2 for the teacher
only, 3 for both; ignored pixels are 255. ``mode=xor`` (RDD's default) trains on 1 and 2, ``or`` on 1, 2, 3,
``and`` on 3, ``student`` (plain OHEM) on 1 and 3.

matplotlib and wandb are imported where they are used, so a run whose logger never fires pays nothing for them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from rdd_lightning import rdd
from rdd_lightning.errors import ConfigError
from rdd_lightning.inference import pad_to_stride

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rdd_lightning.models import SegOutput

log = logging.getLogger(__name__)

__all__ = [
    "CATEGORY_NAMES",
    "IGNORED",
    "RDDOptions",
    "selected_categories",
    "difficulty_maps",
    "class_colours",
    "denormalize",
    "render_difficulty_maps",
    "network_outputs",
    "image_maps",
    "stack_maps",
    "load_network",
    "run_datamodule",
    "DifficultyMapLogger",
]

NEITHER, STUDENT_ONLY, TEACHER_ONLY, BOTH = 0, 1, 2, 3
#: Names of the TSE categories, indexed by category value.
CATEGORY_NAMES = ("neither", "student only", "teacher only", "both")
#: Category (and drawn label) value of ignored pixels.
IGNORED = 255
#: RGB (0..1) of each TSE category: grey, blue, orange, red. Categories the mode does not select are faded.
CATEGORY_COLOURS = ((0.55, 0.55, 0.55), (0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.84, 0.15, 0.16))
IGNORED_COLOUR = (0.0, 0.0, 0.0)
_FADE = 0.7  # share of white mixed into the colour of a category the mode does not train on
_PANEL_INCHES = 2.2
_DPI = 100


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class RDDOptions:
    """The TFE/TSE settings a map is computed with (those of ``distillation.tfe`` and ``distillation.tse``).

    ``from_run`` is ``False`` when the objective is not an RDD one and the package defaults stand in.
    """

    threshold: float = 0.7
    min_kept: int = 100000
    mode: str = "xor"
    confidence: str = "gt_prob"
    kl_direction: str = "aux_to_main"
    ignore_index: int = 255
    from_run: bool = True

    @classmethod
    def from_objective(cls, objective: Any, ignore_index: int = 255) -> RDDOptions:
        """The options of a :class:`~rdd_lightning.distillation.DistillationObjective` whose task is ``tfe``,
        ``tse`` or ``rdd``; the defaults (threshold 0.7, mode xor, ``from_run=False``) for any other objective
        (plain CE, KD, other methods) or ``None``. Keys the config leaves out keep :mod:`rdd`'s defaults."""
        if objective is None or getattr(objective, "task", "ce") not in ("tfe", "tse", "rdd"):
            return cls(ignore_index=ignore_index, from_run=False)
        # the maps are of one image: its share of a per-image minimum (an absolute min_kept as it is)
        tse, tfe = objective.tse_loss_options(batch_size=1), dict(objective.tfe_options)
        keys = ("threshold", "min_kept", "mode", "confidence")
        return cls(
            **{k: tse[k] for k in keys if k in tse},
            **{k: tfe[k] for k in ("kl_direction",) if k in tfe},
            ignore_index=int(getattr(objective, "ignore_index", ignore_index)),
        )

    def describe(self) -> str:
        """One line for a figure title, e.g. ``"mode xor, threshold 0.7, min_kept 3000, gt_prob"``."""
        text = f"mode {self.mode}, threshold {self.threshold:g}, min_kept {self.min_kept}, {self.confidence}"
        return text if self.from_run else f"{text} (RDD defaults: this run's objective is not RDD)"


def selected_categories(mode: str) -> tuple[int, ...]:
    """The TSE categories ``mode`` trains on, e.g. ``(1, 2)`` for ``xor``: :func:`rdd.combine_hard_masks`
    applied to the four (student hard, teacher hard) combinations, in category order."""
    student = torch.tensor([False, True, False, True])
    teacher = torch.tensor([False, False, True, True])
    chosen = rdd.combine_hard_masks(student, teacher, mode)
    return tuple(int(c) for c in torch.nonzero(chosen).flatten())


# ------------------------------------------------------------------------------------------------ maps
def difficulty_maps(
    student_out: SegOutput,
    teacher_out: SegOutput | None,
    target: Tensor,
    *,
    threshold: float = 0.7,
    min_kept: int = 100000,
    mode: str = "xor",
    confidence: str = "gt_prob",
    kl_direction: str = "aux_to_main",
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Predictions, TFE weights and TSE masks of one batch, without gradient.

    Args:
        student_out: the student's output; ``logits`` ``[B, C, hs, ws]`` are read.
        teacher_out: the teacher's output (``logits`` ``[B, C, ht, wt]``, ``aux_logits`` or ``None``), or
            ``None`` for a run without a teacher.
        target: ``[B, H, W]`` integer labels, ``ignore_index`` at void pixels.
        threshold, min_kept, confidence: the hard-pixel settings of :func:`rdd.hard_pixel_mask` (``min_kept``
            counts over the whole batch passed here, as in training).
        mode: how TSE combines the two hard masks (``xor``, ``or``, ``and``, ``student``).
        kl_direction: direction of the teacher's head disagreement (:func:`rdd.tfe_weight`).
        ignore_index: label value of void pixels.

    Returns:
        A dict of tensors on ``target``'s device (``None`` where the input does not allow the map):

        - ``student_pred``, ``teacher_pred``: ``int64 [B, H, W]`` argmax classes at the label size.
        - ``tfe_weight``: ``float32 [B, H, W]`` in ``(0, 1]``; low = the teacher's heads disagree (hard for the
          teacher, down-weighted in stage 1). ``None`` without a teacher aux head.
        - ``student_hard``, ``teacher_hard``: ``bool [B, H, W]`` hard-pixel masks of the main heads.
        - ``category``: ``uint8 [B, H, W]``: 0 neither, 1 student only, 2 teacher only, 3 both, 255 ignored.
        - ``selected``: ``bool [B, H, W]`` the pixels TSE trains on (:func:`rdd.combine_hard_masks`).
        - ``selected_categories``: the categories ``mode`` selects (:func:`selected_categories`).

        Without a teacher only ``student_pred`` is set.
    """
    size = tuple(target.shape[-2:])
    hard = {
        "threshold": threshold,
        "min_kept": min_kept,
        "ignore_index": ignore_index,
        "confidence": confidence,
    }
    with torch.no_grad():
        maps: dict[str, Any] = {
            "student_pred": rdd.upsample_logits(student_out.logits, size).argmax(1),
            "teacher_pred": None,
            "tfe_weight": None,
            "student_hard": None,
            "teacher_hard": None,
            "category": None,
            "selected": None,
            "selected_categories": selected_categories(mode),
        }
        if teacher_out is None:
            return maps
        maps["teacher_pred"] = rdd.upsample_logits(teacher_out.logits, size).argmax(1)
        if teacher_out.aux_logits is not None:
            maps["tfe_weight"] = rdd.tfe_weight(
                teacher_out.logits, teacher_out.aux_logits, size, kl_direction
            )
        student_hard = rdd.hard_pixel_mask(student_out.logits, target, **hard)
        teacher_hard = rdd.hard_pixel_mask(teacher_out.logits, target, **hard)
        category = student_hard.to(torch.uint8) + 2 * teacher_hard.to(torch.uint8)
        maps.update(
            student_hard=student_hard,
            teacher_hard=teacher_hard,
            category=category.masked_fill_(target == ignore_index, IGNORED),
            selected=rdd.combine_hard_masks(student_hard, teacher_hard, mode),
        )
    return maps


def network_outputs(net: nn.Module, images: Tensor) -> SegOutput:
    """``net``'s output on ``images [B, 3, H, W]`` without gradient; sizes that are not a multiple of
    ``net.output_stride`` are zero-padded at the bottom/right and the logits (main and aux) are resized to the
    padded size and cropped back to ``H x W`` (:func:`rdd_lightning.inference.pad_to_stride`, as
    :func:`rdd_lightning.inference.whole_image_logits` does)."""
    h, w = images.shape[-2:]
    padded = pad_to_stride(net, images)
    with torch.no_grad():
        out = net(padded)
        if padded is not images:
            out.logits = rdd.upsample_logits(out.logits, padded.shape[-2:])[..., :h, :w]
            if out.aux_logits is not None:
                out.aux_logits = rdd.upsample_logits(out.aux_logits, padded.shape[-2:])[..., :h, :w]
    return out


def image_maps(
    student: nn.Module,
    teacher: nn.Module | None,
    dataset: Any,
    index: int,
    options: RDDOptions,
    normalization: Any,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, Tensor, dict[str, Any]]:
    """Run both networks (as they are: put them in eval mode first) on validation image ``index`` of
    ``dataset`` (items ``{"image": [3, H, W] normalised, "mask": [H, W]}``) and compute its maps.

    Returns ``(rgb uint8 [1, H, W, 3], target int64 [1, H, W], maps)``, the maps of :func:`difficulty_maps`
    for a batch of this one image (so ``min_kept`` counts its pixels). ``normalization`` has the ``mean``,
    ``std`` and ``bgr`` of the dataset's eval transform (the datamodule's ``normalization``).
    """
    sample = dataset[index]
    image = sample["image"].unsqueeze(0).to(device)
    target = torch.as_tensor(sample["mask"]).long().unsqueeze(0).to(device)
    maps = difficulty_maps(
        network_outputs(student, image),
        network_outputs(teacher, image) if teacher is not None else None,
        target,
        threshold=options.threshold,
        min_kept=options.min_kept,
        mode=options.mode,
        confidence=options.confidence,
        kl_direction=options.kl_direction,
        ignore_index=options.ignore_index,
    )
    rgb = denormalize(sample["image"], normalization.mean, normalization.std, normalization.bgr)
    return rgb[None], target, maps


def stack_maps(per_image: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One batch of maps from the maps of single images of one size (for a figure with a row per image)."""
    first = per_image[0]
    return {
        key: torch.cat([m[key] for m in per_image]) if isinstance(first[key], Tensor) else first[key]
        for key in first
    }


# ------------------------------------------------------------------------------------------------ colours
def class_colours(num_classes: int, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """``uint8 [256, 3]`` lookup table: class ``c`` -> its RGB colour, 255 (void) -> black.

    ``palette`` (the dataset's ``[r, g, b]`` per class, 0..255) where given; classes it lacks get the colours
    of matplotlib's ``tab20`` colormap, in order (fixed, so a class keeps its colour across runs).
    """
    from matplotlib import colormaps

    table = np.zeros((256, 3), dtype=np.uint8)
    tab20 = colormaps["tab20"]
    table[:num_classes] = [np.round(np.asarray(tab20(c % 20)[:3]) * 255) for c in range(num_classes)]
    if palette is not None:
        given = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:num_classes]
        table[: len(given)] = given
    return table


def category_colours(mode: str) -> np.ndarray:
    """``float [256, 3]`` lookup table of the TSE categories (RGB 0..1); categories ``mode`` does not select
    are faded towards white, ignored pixels black."""
    table = np.zeros((256, 3))
    chosen = selected_categories(mode)
    for category, colour in enumerate(CATEGORY_COLOURS):
        rgb = np.asarray(colour)
        table[category] = rgb if category in chosen else rgb + _FADE * (1.0 - rgb)
    table[IGNORED] = IGNORED_COLOUR
    return table


def category_label(category: int, mode: str) -> str:
    """Legend text of a category, e.g. ``"student only: trained"`` or ``"both: dropped"`` under ``xor``."""
    used = category in selected_categories(mode)
    return f"{CATEGORY_NAMES[category]}: {'trained' if used else 'dropped'}"


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float], bgr: bool = False) -> np.ndarray:
    """Undo the eval transform: ``image [3, H, W]`` float ``(pixel / 255 - mean) / std`` (channels BGR when
    ``bgr``) -> ``uint8 [H, W, 3]`` RGB."""
    x = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    x = (x * np.asarray(std) + np.asarray(mean)) * 255.0
    x = x[..., ::-1] if bgr else x
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ figure
def render_difficulty_maps(
    images: np.ndarray,
    target: Tensor,
    maps: Mapping[str, Any],
    *,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]] | None = None,
    mode: str = "xor",
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> Figure:
    """Draw a batch's maps, one row per image, on a new :class:`~matplotlib.figure.Figure` (Agg, no pyplot).

    Panels: image | ground truth | teacher prediction | student prediction | TFE weight (0..1, colour bar) |
    TSE selection (categories, legend naming each and whether ``mode`` trains on it). Without a teacher only
    image | ground truth | student are drawn; without a TFE map (no teacher aux head) that panel is left out
    and a note says why. Save with ``fig.savefig(path)``: the PNG is ``fig.get_size_inches() * fig.dpi``
    pixels (no tight bounding box).

    Args:
        images: ``uint8 [B, H, W, 3]`` RGB images (see :func:`denormalize`).
        target: ``[B, H, W]`` labels (void 255).
        maps: what :func:`difficulty_maps` returned for these images.
        class_names: one name per class (for the class legend).
        palette: the dataset's ``[r, g, b]`` per class, or ``None`` (see :func:`class_colours`).
        mode: the TSE mode the maps were computed with.
        title: figure title (e.g. the step and the RDD options).
        row_labels: one label per image (e.g. ``"val image 3"``), or ``None``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    has_teacher, has_tfe = maps["teacher_pred"] is not None, maps["tfe_weight"] is not None
    columns = ["image", "ground truth"]
    columns += ["teacher", "student"] if has_teacher else ["student"]
    columns += ["TFE weight", "TSE selection"] if has_tfe else (["TSE selection"] if has_teacher else [])
    rows = len(images)
    fig = Figure(
        figsize=(_PANEL_INCHES * len(columns) + 0.6, _PANEL_INCHES * rows + 1.2),
        dpi=_DPI,
        layout="constrained",
    )
    axes = np.asarray(fig.subplots(rows, len(columns), squeeze=False))
    colours = class_colours(len(class_names), palette)
    tse_colours = category_colours(mode)
    labels = target.detach().cpu().numpy().astype(np.int64)
    shown = set()
    for r in range(rows):
        panels: dict[str, np.ndarray] = {
            "image": images[r],
            "ground truth": colours[np.clip(labels[r], 0, 255)],
        }
        shown.update(np.unique(labels[r]).tolist())
        for name, key in (("teacher", "teacher_pred"), ("student", "student_pred")):
            if maps[key] is not None:
                pred = maps[key][r].cpu().numpy()
                panels[name] = colours[pred]
                shown.update(np.unique(pred).tolist())
        if has_teacher:
            panels["TSE selection"] = tse_colours[maps["category"][r].cpu().numpy()]
        for c, column in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column, fontsize="medium")
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize="small")
            if column == "TFE weight":
                heat = ax.imshow(maps["tfe_weight"][r].cpu().numpy(), cmap="magma", vmin=0.0, vmax=1.0)
                fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02, ticks=[0, 0.5, 1])
            else:
                ax.imshow(panels[column], interpolation="nearest")
    handles = [
        Patch(facecolor=colours[c] / 255.0, label=class_names[c])
        for c in sorted(shown)
        if c < len(class_names)
    ]
    if IGNORED in shown:
        handles.append(Patch(facecolor=np.asarray(IGNORED_COLOUR), label="void (ignored)"))
    fig.legend(
        handles=handles,
        loc="outside lower left",
        ncols=min(len(handles), 8),
        fontsize="small",
        frameon=False,
        title="classes",
        title_fontsize="small",
    )
    if has_teacher:
        tse = [
            Patch(facecolor=tse_colours[c], label=category_label(c, mode)) for c in range(len(CATEGORY_NAMES))
        ]
        fig.legend(
            handles=tse,
            loc="outside lower right",
            ncols=2,
            fontsize="small",
            frameon=False,
            title=f"TSE: hard for ... (mode {mode})",
            title_fontsize="small",
        )
    notes = []
    if has_teacher and not has_tfe:
        notes.append("TFE weight not shown: the teacher has no auxiliary head (teacher.aux_head=false)")
    if not has_teacher:
        notes.append("no teacher in this run: TFE weights and TSE selections need one")
    if title or notes:
        fig.suptitle("\n".join([t for t in (title,) if t] + notes), fontsize="medium")
    return fig


# ------------------------------------------------------------------------------------------------ callback
def _check_every_n(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"callbacks.difficulty_maps.every_n_validations={value!r}: not a whole number >= 1; set it to 1 to "
            f"draw at every validation, N for every N-th, or remove the callback with ~callbacks.difficulty_maps"
        )
    return value


def _check_indices(value: Any) -> list[int]:
    indices = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ConfigError(
            f"callbacks.difficulty_maps.indices={value!r}: expected a non-empty list of validation image "
            f"indices >= 0, e.g. [0,1,2,3]"
        )
    return list(dict.fromkeys(indices))  # duplicates drawn once, order kept


class DifficultyMapLogger(L.Callback):
    """Draw TFE weights and TSE selections of fixed validation images every N-th validation.

    At the end of every ``every_n_validations``-th validation (sanity checks do not count), global rank 0 runs
    the student and the teacher (``pl_module.student``, ``pl_module.teacher``; eval mode, no gradient; their
    train/eval modes are restored afterwards) on the validation images ``indices`` of
    ``trainer.datamodule``, one image at a time (validation images may differ in size), computes
    :func:`difficulty_maps` with the run's RDD options (:meth:`RDDOptions.from_objective`) and logs:

    - to every :class:`~lightning.pytorch.loggers.WandbLogger`: ``val/difficulty_maps/segmentation`` (the image
      with ``ground_truth``, ``student`` and ``teacher`` masks), ``val/difficulty_maps/tfe_weight`` and
      ``val/difficulty_maps/tse_selection`` (colour images), at ``trainer/global_step``;
    - as PNGs ``<dirpath>/step<global_step:06d>_img<index>.png`` (see :func:`render_difficulty_maps`) when the
      trainer has a logger other than W&B, or none.

    Other ranks do nothing (no collective operation, so nothing can wait on them). Indices beyond the
    validation set are skipped with one warning. The validation counter is saved in checkpoints, so a resumed
    run keeps the every-N rhythm.

    Args:
        every_n_validations: draw at every N-th validation (1: every one).
        indices: validation image indices (the same images every time).
        dirpath: folder of the PNGs (the config's ``${paths.output_dir}/difficulty_maps``); ``None``:
            ``<trainer.default_root_dir>/<dirname>``.
        dirname: the folder name used when ``dirpath`` is ``None``.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        indices: Sequence[int] = (0, 1, 2, 3),
        dirpath: str | None = None,
        dirname: str = "difficulty_maps",
    ):
        self.every_n_validations = _check_every_n(every_n_validations)
        self.indices = _check_indices(indices)
        self.dirpath = dirpath
        self.dirname = dirname
        self.validations = 0
        self._warned = False

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    # ---------------------------------------------------------------------------------------- hook
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations or not trainer.is_global_zero:
            return
        self.log_maps(trainer, pl_module)

    def output_dir(self, trainer: L.Trainer) -> Path:
        return (
            Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir) / self.dirname
        )

    def _indices_in(self, size: int) -> list[int]:
        kept = [i for i in self.indices if i < size]
        if len(kept) < len(self.indices) and not self._warned:
            self._warned = True
            warnings.warn(
                f"callbacks.difficulty_maps.indices={self.indices}: the validation set has {size} images; "
                f"drawing {kept} only",
                stacklevel=2,
            )
        return kept

    def log_maps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Compute, draw and log the maps of :attr:`indices` now; returns the PNG files written."""
        from lightning.pytorch.loggers import WandbLogger

        datamodule = trainer.datamodule
        dataset = _validation_dataset(trainer)
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        write_png = not wandb_loggers or len(wandb_loggers) < len(trainer.loggers)
        student, teacher = pl_module.student, getattr(pl_module, "teacher", None)
        ignore_index = int(getattr(datamodule, "ignore_index", 255))
        options = RDDOptions.from_objective(getattr(pl_module, "objective", None), ignore_index)
        class_names = list(getattr(datamodule, "class_names", None) or pl_module.class_names)
        palette = getattr(datamodule, "palette", None)
        norm = datamodule.normalization
        step = int(trainer.global_step)
        written, records = [], []
        networks = [n for n in (student, teacher) if n is not None]
        modes = [n.training for n in networks]
        try:
            for net in networks:
                net.eval()
            for index in self._indices_in(len(dataset)):
                rgb, target, maps = image_maps(
                    student, teacher, dataset, index, options, norm, pl_module.device
                )
                records.append((index, rgb, target[0], maps))
                if write_png:
                    fig = render_difficulty_maps(
                        rgb,
                        target,
                        maps,
                        class_names=class_names,
                        palette=palette,
                        mode=options.mode,
                        title=f"step {step}, val image {index}: {options.describe()}",
                    )
                    path = self.output_dir(trainer) / f"step{step:06d}_img{index}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fig.savefig(path)
                    written.append(path)
        finally:
            for net, mode in zip(networks, modes, strict=True):
                net.train(mode)
        for logger in wandb_loggers:
            logger.log_metrics(_wandb_images(records, class_names, palette, options.mode), step=step)
        return written


def _validation_dataset(trainer: L.Trainer):
    """The validation dataset: ``trainer.datamodule.dataset("val")`` (this package's datamodule), else the
    dataset of the trainer's validation loader."""
    datamodule = trainer.datamodule
    if datamodule is not None and callable(getattr(datamodule, "dataset", None)):
        return datamodule.dataset("val")
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, Sequence) else loaders
    return loader.dataset


def _wandb_images(
    records: Sequence[tuple[int, np.ndarray, Tensor, Mapping[str, Any]]],
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]] | None,
    mode: str,
) -> dict[str, list[Any]]:
    """``{key: [wandb.Image, ...]}`` of the drawn images: segmentation masks, TFE heat maps, TSE categories."""
    import wandb
    from matplotlib import colormaps

    labels = {i: name for i, name in enumerate(class_names)} | {IGNORED: "void"}
    tse_colours = category_colours(mode)
    names = ", ".join(category_label(c, mode) for c in range(len(CATEGORY_NAMES)))
    out: dict[str, list[Any]] = {"val/difficulty_maps/segmentation": []}
    for index, rgb, target, maps in records:
        masks = {"ground_truth": {"mask_data": target.cpu().numpy().astype(np.uint8), "class_labels": labels}}
        for name in ("student", "teacher"):
            if maps[f"{name}_pred"] is not None:
                pred = maps[f"{name}_pred"][0].cpu().numpy().astype(np.uint8)
                masks[name] = {"mask_data": pred, "class_labels": labels}
        out["val/difficulty_maps/segmentation"].append(
            wandb.Image(rgb[0], masks=masks, caption=f"val image {index}")
        )
        if maps["tfe_weight"] is not None:
            heat = colormaps["magma"](maps["tfe_weight"][0].cpu().numpy())[..., :3]
            out.setdefault("val/difficulty_maps/tfe_weight", []).append(
                wandb.Image(
                    np.round(heat * 255).astype(np.uint8),
                    caption=f"val image {index}: TFE weight, dark = low (hard for the teacher)",
                )
            )
        if maps["category"] is not None:
            tse = tse_colours[maps["category"][0].cpu().numpy()]
            out.setdefault("val/difficulty_maps/tse_selection", []).append(
                wandb.Image(np.round(tse * 255).astype(np.uint8), caption=f"val image {index}: {names}")
            )
    return out


# ------------------------------------------------------------------------------------------------ checkpoints
def load_network(ckpt_path: str | Path) -> nn.Module:
    """The network of a checkpoint of this package (student or teacher run), frozen, in eval mode, built from
    the network it records (:func:`rdd_lightning.teacher.rebuild_network`, which checks the weights)."""
    from rdd_lightning.teacher import read_checkpoint, rebuild_network

    checkpoint = read_checkpoint(ckpt_path)
    described = (checkpoint.get("rdd_lightning") or {}).get("student") or {}
    if "num_classes" not in described:
        raise ConfigError(
            f"checkpoint {str(ckpt_path)!r} records no network (not a checkpoint of rdd_lightning.train?); "
            f"pass a run's checkpoints/best.ckpt or last.ckpt"
        )
    return rebuild_network(Path(ckpt_path), checkpoint, None, described["num_classes"])


def run_datamodule(ckpt_path: str | Path) -> tuple[Any, RDDOptions]:
    """The validation data and the RDD options of the run that wrote ``ckpt_path``
    (``<run dir>/checkpoints/<name>.ckpt``).

    The package's ``train`` config is composed with the run's overrides (from its ``results.json``, else
    ``.hydra/overrides.yaml``), the paths rooted at ``$RDD_ROOT``, else the run's working directory, else the
    current one (``$RDD_DATA_DIR`` and ``$RDD_CACHE_DIR`` apply as in training; the synthetic dataset is
    generated again where it is missing). Returns ``(datamodule set up for validation, options)``.
    """
    import os

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from rdd_lightning.builders import build_datamodule, build_objective
    from rdd_lightning.report import load_results, read_overrides

    run_dir = Path(ckpt_path).resolve().parent.parent
    finished = (run_dir / "results.json").is_file()
    if not finished and not (run_dir / ".hydra" / "overrides.yaml").is_file():
        raise ConfigError(
            f"{str(run_dir)!r} (two levels above checkpoint {str(ckpt_path)!r}) has neither results.json nor "
            f".hydra/overrides.yaml; pass a checkpoint inside the run directory that wrote it"
        )
    overrides = read_overrides(run_dir, load_results(run_dir) if finished else None)
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    recorded_cwd = (
        OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd") if hydra_file.is_file() else None
    )
    root = os.environ.get("RDD_ROOT") or recorded_cwd or os.getcwd()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.root_dir='{root}'", *overrides])
    datamodule = build_datamodule(cfg, stage="validate")
    options = RDDOptions.from_objective(build_objective(cfg, datamodule), datamodule.ignore_index)
    return datamodule, options

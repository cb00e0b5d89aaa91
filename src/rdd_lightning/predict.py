"""Segment images with a trained network: ``python -m rdd_lightning.predict ckpt_path=<file> input=<image |
folder | glob> [output=<folder>]``, or ``... dataset=<name> split=<train|val|test>`` for a dataset's split.

Composed by Hydra from ``conf/predict.yaml``. ``ckpt_path`` is anything :func:`rdd_lightning.deploy.load_model`
opens (a run's checkpoint, a weight file with ``student=``, or a file of ``rdd_lightning.export``). Images
are predicted at their own size with the ``inference`` settings, through the same code as ``evaluate``
(:func:`rdd_lightning.inference.predict_logits`), in batches of equal-size images. Per image, ``output``
receives ``masks/<name>.png`` (the classes in the dataset's colours), ``overlays/<name>.<overlay_format>``
and, with ``save.labels=true``, ``labels/<name>.png`` (class ids); ``submission=cityscapes|ade20k|voc`` adds
the files of that benchmark's server (:mod:`rdd_lightning.submission`) and their archive. ``<name>`` is the
image's path below the deepest folder holding all inputs, without its suffix. ``predictions.json`` sums up
the run. Existing files are never replaced unless ``overwrite=true``; the check runs before any prediction.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text
from torch.utils.data import DataLoader

from rdd_lightning.data.images import ImageFiles, SizeBatches, image_size, list_images, output_names
from rdd_lightning.deploy import ModelCard, datamodule_of, load_model
from rdd_lightning.drawing import colour_mask, overlay
from rdd_lightning.errors import ConfigError, exit_on_config_error
from rdd_lightning.inference import InferenceConfig
from rdd_lightning.resume import write_json
from rdd_lightning.submission import SubmissionFormat, submission_format

log = logging.getLogger("rdd_lightning.predict")

PRECISIONS = {"32": None, "32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
SPLITS = ("train", "val", "test")
OVERLAY_FORMATS = ("jpg", "png")


# ------------------------------------------------------------------------------------------------ inputs
def input_images(cfg: DictConfig) -> tuple[list[Path], str]:
    """The images to predict and a description of where they came from (``input=`` or the dataset split)."""
    if cfg.get("input") not in (None, ""):
        if cfg.get("split") is not None:
            raise ConfigError(f"input={cfg.input!r} and split={cfg.split!r}: give one of them")
        return list_images(str(cfg.input)), str(cfg.input)
    if cfg.get("split") is None:
        raise ConfigError(
            "nothing to predict: pass input=<an image, a folder or a glob>, or dataset=<name> split=<split>"
        )
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r}: choose one of {list(SPLITS)}")
    if cfg.get("dataset") is None:
        raise ConfigError(f"split={cfg.split} needs dataset=<name> (the dataset whose split is predicted)")
    datamodule = datamodule_of(cfg.dataset)
    datamodule.prepare_data()  # the synthetic dataset is generated on first use
    dataset = datamodule.dataset_cls(datamodule.root, datamodule.splits[cfg.split], labels=False)
    return [image for image, _ in dataset.pairs], f"dataset={datamodule.name} split={cfg.split}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r}: {err}; use auto, cpu, cuda or cuda:<index>") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: no CUDA device here; use device=cpu (or auto)")
    return device


def check_settings(cfg: DictConfig) -> InferenceConfig:
    """Fail before any work on a setting that cannot be used."""
    if cfg.get("ckpt_path") in (None, ""):
        raise ConfigError(
            "ckpt_path is required: pass ckpt_path=<a checkpoint or an exported file>, e.g. "
            "ckpt_path=logs/train/runs/<time>/checkpoints/best.ckpt"
        )
    if not Path(str(cfg.ckpt_path)).expanduser().is_file():
        raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r}: file not found")
    if str(cfg.precision) not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision}: choose one of {list(PRECISIONS)}")
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: give at least 1")
    if not 0.0 <= float(cfg.overlay_alpha) <= 1.0:
        raise ConfigError(f"overlay_alpha={cfg.overlay_alpha}: use a value in [0, 1]")
    if cfg.overlay_format not in OVERLAY_FORMATS:
        raise ConfigError(f"overlay_format={cfg.overlay_format!r}: choose one of {list(OVERLAY_FORMATS)}")
    if not any(cfg.save.values()) and cfg.get("submission") is None:
        raise ConfigError(
            "save.mask, save.overlay and save.labels are all false and submission=null: nothing to write"
        )
    return InferenceConfig.from_any(OmegaConf.to_container(cfg.inference, resolve=True))


# ------------------------------------------------------------------------------------------------ output
class PredictionWriter:
    """The files of every image (:meth:`targets`), checked free before any prediction, then written.

    Args:
        output: the output folder.
        names: one name per image (:func:`~rdd_lightning.data.images.output_names`).
        save: which of ``mask``, ``overlay``, ``labels`` to write.
        submission: the server format to write as well, or ``None``.

    :attr:`palette` (``uint8 [C, 3]`` class colours) is set once the network's card is known.
    """

    def __init__(
        self,
        output: Path,
        names: list[str],
        save: dict[str, bool],
        overlay_alpha: float,
        overlay_format: str,
        submission: SubmissionFormat | None,
    ):
        self.output, self.names, self.palette = output, names, None
        self.save, self.alpha, self.overlay_format = save, overlay_alpha, overlay_format
        self.submission = submission
        self.submission_dir = output / "submission" / submission.name if submission is not None else None
        self.files = [self.targets(name) for name in names]  # a bad Cityscapes name fails here

    def targets(self, name: str) -> dict[str, Path]:
        """``{kind: path}`` of the files written for the image ``name``."""
        out = {}
        if self.save.get("mask"):
            out["mask"] = self.output / "masks" / f"{name}.png"
        if self.save.get("overlay"):
            out["overlay"] = self.output / "overlays" / f"{name}.{self.overlay_format}"
        if self.save.get("labels"):
            out["labels"] = self.output / "labels" / f"{name}.png"
        if self.submission is not None:
            out["submission"] = self.submission_dir / self.submission.relative_path(name)
        return out

    def summary_path(self) -> Path:
        return self.output / "predictions.json"

    def archive_path(self) -> Path | None:
        return self.output / "submission" / self.submission.archive_name() if self.submission else None

    def check_free(self, overwrite: bool) -> None:
        """Refuse to replace any existing file unless ``overwrite``; two images with one target also fail."""
        planned = [p for files in self.files for p in files.values()]
        planned += [p for p in (self.summary_path(), self.archive_path()) if p is not None]
        twice = [p for p, n in Counter(planned).items() if n > 1]
        if twice:  # only a submission's flat layout can map two images to one file
            raise ConfigError(
                f"two input images would be written to {str(twice[0])!r} (submission={self.submission.name} "
                f"keeps only the file name): predict images with distinct names"
            )
        existing = [p for p in planned if p.exists()]
        if existing and not overwrite:
            raise ConfigError(
                f"output={str(self.output)!r} already holds {len(existing)} of the files to write, e.g. "
                f"{str(existing[0])!r}; pass a new output=<folder>, or overwrite=true to replace them"
            )

    def write(self, index: int, classes: np.ndarray, pixels: np.ndarray) -> None:
        """Write image ``index``'s files from its classes ``[H, W]`` and pixels ``uint8 [H, W, 3]``."""
        files = self.files[index]
        mask = colour_mask(classes, self.palette)
        images = {
            "mask": lambda: Image.fromarray(mask),
            "overlay": lambda: Image.fromarray(overlay(pixels, mask, self.alpha)),
            "labels": lambda: Image.fromarray(
                classes.astype(np.uint8 if len(self.palette) <= 256 else np.uint16)
            ),
            "submission": lambda: self.submission.encode(classes),
        }
        for kind, path in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            options = {"quality": 95} if path.suffix == ".jpg" else {}
            images[kind]().save(path, **options)

    def finish(self) -> Path | None:
        """The server's archive of the submission files (when a submission is written)."""
        if self.submission is None:
            return None
        return self.submission.write_archive(self.submission_dir, self.archive_path())


# ------------------------------------------------------------------------------------------------ run
class ImagesPerSecond(ProgressColumn):
    """The progress bar's speed, in images per second."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.completed and task.elapsed:  # rich needs two updates for its estimate
            speed = task.completed / task.elapsed
        return Text(f"{speed:.2f} img/s" if speed else "- img/s", style="progress.data.speed")


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ImagesPerSecond(),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict as ``cfg`` says; return (and write to ``<output>/predictions.json``) a summary."""
    start = time.time()
    inference = check_settings(cfg)
    paths, source = input_images(cfg)
    device = resolve_device(str(cfg.device))
    server = submission_format(str(cfg.submission)) if cfg.get("submission") is not None else None
    output = Path(str(cfg.output)).expanduser().resolve()
    save = {k: bool(v) for k, v in cfg.save.items()}
    writer = PredictionWriter(
        output, output_names(paths), save, float(cfg.overlay_alpha), str(cfg.overlay_format), server
    )
    writer.check_free(bool(cfg.overwrite))
    model = load_model(
        cfg.ckpt_path, student_cfg=cfg.get("student"), dataset_cfg=cfg.get("dataset"), device=device
    )
    card: ModelCard = model.card
    model.check_inference(inference)
    dtype = PRECISIONS[str(cfg.precision)]
    if dtype is not None and card.format != "checkpoint":
        raise ConfigError(
            f"precision={cfg.precision}: mixed precision applies to checkpoints, not to {card.format} files"
        )
    if server is not None:
        server.check_classes(card.num_classes, f"ckpt_path={cfg.ckpt_path}")
    writer.palette = np.asarray(card.palette, dtype=np.uint8)

    loader = DataLoader(
        ImageFiles(paths, card.normalization),
        batch_sampler=SizeBatches([image_size(p) for p in paths], int(cfg.batch_size)),
        num_workers=int(cfg.num_workers),
    )
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    predict_start = time.time()
    with progress_bar(bool(cfg.progress_bar)) as progress, autocast:
        task = progress.add_task("predict", total=len(paths))
        for batch in loader:
            classes = model.classes(batch["image"].to(device), inference).cpu().numpy()
            for index, pred, pixels in zip(
                batch["index"].tolist(), classes, batch["pixels"].numpy(), strict=True
            ):
                writer.write(index, pred, pixels)
            progress.advance(task, len(classes))
    predict_time = time.time() - predict_start
    archive = writer.finish()

    summary = {
        "task_name": cfg.task_name,
        "checkpoint": str(Path(str(cfg.ckpt_path)).expanduser().resolve()),
        "format": card.format,
        "input": source,
        "num_images": len(paths),
        "output": str(output),
        "written": sorted({kind for files in writer.files for kind in files}),
        "submission": {"format": server.name, "folder": str(writer.submission_dir), "archive": str(archive)}
        if server is not None
        else None,
        "inference": inference.to_dict(),
        "device": str(device),
        "precision": str(cfg.precision),
        "images_per_s": round(len(paths) / predict_time, 3) if predict_time > 0 else None,
        "wall_time_s": round(time.time() - start, 2),
        "model": card.to_dict(),
    }
    output.mkdir(parents=True, exist_ok=True)
    write_json(writer.summary_path(), summary)
    log.info("%d images (%s) -> %s (%.2f images/s)", len(paths), source, output, summary["images_per_s"] or 0)
    return summary


@hydra.main(version_base="1.3", config_path="pkg://rdd_lightning.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision("high")
    exit_on_config_error(lambda: run(cfg), log)


if __name__ == "__main__":
    main()

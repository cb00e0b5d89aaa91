"""The trained student outside training: one way to open it, what it needs and means, and its exportable form.

* :func:`load_model` is the one place where ``predict`` (and ``export``, through :func:`open_checkpoint`)
  open a file: a checkpoint of this package or any weight file :func:`rdd_lightning.teacher.rebuild_network`
  accepts, a ``state_dict`` export, an ONNX file or a TorchScript file of ``rdd_lightning.export``. Every one
  becomes a :class:`Segmenter` that predicts class maps of normalised images with the
  :mod:`rdd_lightning.inference` settings.
* :class:`ModelCard` says what a network needs and means: classes, palette, input normalisation, output
  stride, what an exported file takes and returns, and where it came from (validation mIoU, teacher,
  distillation method, source run). ``export`` writes it beside (and into) every exported file.
* :class:`StandaloneSegmenter` is the exported graph: [uint8 RGB -> normalised] -> pad to the stride ->
  network -> [logits at the input size] -> [class map]; TorchScript-compatible.

Where a checkpoint's classes, palette and normalisation come from, first found wins: the card inside a
``state_dict`` export; the ``dataset`` section of the run's own ``.hydra/config.yaml`` (the checkpoint sits in
``<run dir>/checkpoints/``); the ``dataset=`` given on the command line; the package's config of the dataset
the checkpoint records.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from rdd_lightning.data.transforms import Normalization
from rdd_lightning.drawing import class_palette
from rdd_lightning.errors import ConfigError
from rdd_lightning.inference import InferenceConfig, predict_logits, resize_and_crop, stride_padding
from rdd_lightning.report import load_results
from rdd_lightning.teacher import check_normalization, read_checkpoint, rebuild_network

log = logging.getLogger(__name__)

#: What an exported network returns: logits at its own resolution (1/output_stride of the input, which must
#: be a multiple of the stride), logits at the input size, or the class map (``int64 [B, H, W]``).
RETURNS = ("logits_net", "logits_input", "class_map")
FORMATS = ("onnx", "torchscript", "state_dict")
CARD_SCHEMA = "rdd_lightning/model_card/1"
#: The card's key in an ONNX file's metadata, a TorchScript file's extra files and a state_dict export.
CARD_KEY = "rdd_lightning_model_card.json"


# ------------------------------------------------------------------------------------------------ card
@dataclass
class ModelCard:
    """What a network needs and means (see the module docstring); ``details`` holds its provenance."""

    class_names: list[str]
    palette: list[list[int]]
    normalization: Normalization
    output_stride: int
    dataset: str | None = None
    format: str = "checkpoint"  # checkpoint | onnx | torchscript | state_dict
    returns: str = "logits_net"
    uint8_input: bool = False  # the normalisation is part of the network: it takes uint8 RGB pixels
    aux_output: bool = False  # an exported file also returns the auxiliary head's output (second)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data (the layout of ``<exported file>.json``)."""
        norm = self.normalization
        multiple = self.output_stride if self.returns == "logits_net" else 1
        size = "any" if multiple == 1 else f"a multiple of {multiple}"
        at = f"1/{self.output_stride} of the input size" if self.returns == "logits_net" else "the input size"
        shape = "[B, H, W] class ids" if self.returns == "class_map" else f"[B, C, h, w] logits at {at}"
        return {
            "schema": CARD_SCHEMA,
            "format": self.format,
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "classes": list(self.class_names),
            "palette": [list(c) for c in self.palette],
            "normalization": {
                "formula": "(pixel / 255 - mean) / std per channel, in the channel order below",
                "mean": list(norm.mean),
                "std": list(norm.std),
                "channel_order": "BGR" if norm.bgr else "RGB",
                "baked_in": self.uint8_input,
            },
            "input": {
                "name": "images",
                "layout": "NCHW",
                "dtype": "uint8" if self.uint8_input else "float32",
                "content": "RGB pixels 0..255"
                if self.uint8_input
                else "normalised images (see normalization)",
                "height": size,
                "width": size,
            },
            "output": {
                "returns": self.returns,
                "dtype": "int64" if self.returns == "class_map" else "float32",
                "shape": shape,
                "aux": self.aux_output,
            },
            "output_stride": self.output_stride,
            **self.details,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> ModelCard:
        """The card of :meth:`to_dict` (``where`` names its file in errors)."""
        if data.get("schema") != CARD_SCHEMA:
            raise ConfigError(f"{where}: not a model card of rdd_lightning (schema {data.get('schema')!r})")
        norm = data["normalization"]
        known = set(cls.__dataclass_fields__) | {"schema", "num_classes", "classes", "input", "output"}
        return cls(
            class_names=list(data["classes"]),
            palette=[list(c) for c in data["palette"]],
            normalization=Normalization(
                tuple(norm["mean"]), tuple(norm["std"]), bgr=norm["channel_order"] == "BGR"
            ),
            output_stride=int(data["output_stride"]),
            dataset=data.get("dataset"),
            format=data.get("format", "checkpoint"),
            returns=data["output"]["returns"],
            uint8_input=bool(norm["baked_in"]),
            aux_output=bool(data["output"].get("aux", False)),
            details={k: v for k, v in data.items() if k not in known},
        )


# ------------------------------------------------------------------------------------------------ runs
def source_run_dir(ckpt_path: Path) -> Path | None:
    """The run directory that wrote ``ckpt_path`` (``<run dir>/checkpoints/<name>.ckpt``), if it is one."""
    run_dir = ckpt_path.resolve().parent.parent
    if (run_dir / "results.json").is_file() or (run_dir / ".hydra" / "config.yaml").is_file():
        return run_dir
    return None


def run_dataset_config(run_dir: Path) -> dict[str, Any] | None:
    """The ``dataset`` config of a run, resolved with the paths of that run (``$RDD_ROOT``, else the run's
    working directory; ``$RDD_DATA_DIR``/``$RDD_CACHE_DIR`` as in training): the section of its
    ``.hydra/config.yaml``, else the package's ``train`` config composed with the overrides its
    ``results.json`` records (a run whose ``hydra.output_subdir`` was off)."""
    config_file = run_dir / ".hydra" / "config.yaml"
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd") if hydra_file.is_file() else None
    root = os.environ.get("RDD_ROOT") or cwd or os.getcwd()
    if config_file.is_file():
        cfg = OmegaConf.load(config_file)
        if "paths" in cfg:
            cfg.paths.root_dir, cfg.paths.output_dir = root, str(run_dir)
    elif (run_dir / "results.json").is_file():
        overrides = [str(o) for o in load_results_json(run_dir).get("overrides") or []]
        cfg = package_config("train", [*overrides, f"paths.root_dir='{root}'"], f"run {str(run_dir)!r}")
        cfg.paths.output_dir = str(run_dir)
    else:
        return None
    return OmegaConf.to_container(cfg.dataset, resolve=True) if "dataset" in cfg else None


def package_config(config_name: str, overrides: list[str], what: str) -> DictConfig:
    """The package's ``config_name`` config composed with ``overrides`` (inside a Hydra app or not)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app
            cfg = compose(config_name=config_name, overrides=overrides)
        else:
            with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
                cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as err:  # Hydra's missing-config and override errors
        raise ConfigError(
            f"cannot compose the config of {what} ({str(err).splitlines()[0]}); pass dataset=<its dataset config>"
        ) from err
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = os.getcwd()  # `${hydra:...}` outside a run
    return cfg


def package_dataset_config(name: str) -> dict[str, Any]:
    """The package's ``dataset/<name>`` config, resolved (for checkpoints that record only the name)."""
    cfg = package_config("predict", [f"dataset={name}"], f"dataset {name!r} (which the checkpoint records)")
    cfg.paths.root_dir = os.environ.get("RDD_ROOT") or os.getcwd()
    return OmegaConf.to_container(cfg.dataset, resolve=True)


def datamodule_of(config: Mapping[str, Any] | DictConfig) -> Any:
    """The :class:`~rdd_lightning.data.SegmentationDataModule` of a dataset config (no file is read)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    return instantiate(dict(config), _convert_="all")


def load_results_json(run_dir: Path | None) -> dict[str, Any]:
    """The run's ``results.json`` (:func:`rdd_lightning.report.load_results`), ``{}`` when it has none."""
    if run_dir is None or not (run_dir / "results.json").is_file():
        return {}
    return load_results(run_dir)


def provenance(ckpt_path: Path, checkpoint: Mapping[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """Where a checkpoint came from, for its card: the validation mIoU of these weights, the teacher, the
    distillation method and the source run (from the checkpoint's record and the run's ``results.json``)."""
    results = load_results_json(run_dir)
    metadata = checkpoint.get("rdd_lightning") or {}
    resolved = str(ckpt_path.resolve())
    which = next(
        (
            k
            for k in ("best", "last")
            if results.get(f"{k}_checkpoint") and str(Path(results[f"{k}_checkpoint"]).resolve()) == resolved
        ),
        None,
    )
    miou = {"best": results.get("best_val_miou"), "last": results.get("final_val_miou")}.get(which)
    teacher = metadata.get("teacher") or {}
    distillation = results.get("distillation")
    if distillation is None and run_dir is not None and (run_dir / ".hydra" / "hydra.yaml").is_file():
        distillation = OmegaConf.select(
            OmegaConf.load(run_dir / ".hydra" / "hydra.yaml"), "hydra.runtime.choices.distillation"
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    return {
        "network": metadata.get("network") or metadata.get("student"),
        "validation": {
            "split": "val",
            "miou": miou,
            "weights": which,  # best | last (the run's best.ckpt / last.ckpt) | null (another checkpoint)
            "run_best_miou": results.get("best_val_miou"),
            "inference": hparams.get("inference"),
        },
        "teacher": (
            {
                "checkpoint": teacher.get("checkpoint"),
                "sha256": teacher.get("sha256"),
                "val_miou": results.get("teacher_val_miou"),
            }
            if teacher
            else None
        ),
        "distillation": distillation,
        "source": {
            "checkpoint": resolved,
            "run_dir": str(run_dir) if run_dir is not None else None,
            "global_step": checkpoint.get("global_step"),
            "seed": results.get("seed"),
            "experiment": results.get("experiment"),
            "overrides": results.get("overrides"),
        },
    }


# ------------------------------------------------------------------------------------------------ networks
class Segmenter:
    """A network opened by :func:`load_model`: :meth:`classes` of normalised images, whatever its file.

    ``net`` maps normalised images ``[B, 3, H, W]`` to logits (``output_stride`` attribute, as
    :mod:`rdd_lightning.inference` expects), or, for ``card.returns == "class_map"``, to class ids.
    """

    def __init__(self, net: Callable[[Tensor], Any], card: ModelCard, path: Path):
        self.net, self.card, self.path = net, card, path

    def check_inference(self, inference: InferenceConfig) -> None:
        """A class-map export predicts whole images only (the views of the other modes merge logits)."""
        if self.card.returns == "class_map" and (inference.mode != "whole" or not inference.single_view):
            raise ConfigError(
                f"ckpt_path={str(self.path)!r} returns class maps, so it predicts whole images only; "
                f"inference={inference.to_dict()} merges logits: export with returns=logits_input, or leave "
                f"inference at mode=whole, scales=[1.0], flip=false"
            )

    @torch.no_grad()
    def classes(self, images: Tensor, inference: InferenceConfig) -> Tensor:
        """Predicted classes ``int64 [B, H, W]`` of normalised images ``[B, 3, H, W]``."""
        if self.card.returns == "class_map":
            return self.net(images).long()
        return predict_logits(self.net, images, inference).argmax(1)


def pixels_of(images: Tensor, normalization: Normalization) -> Tensor:
    """``uint8 [B, 3, H, W]`` RGB pixels of normalised images ``[B, 3, H, W]`` (the eval transform undone,
    rounded: exact for images that were uint8 pixels)."""
    mean = images.new_tensor(normalization.mean).view(1, 3, 1, 1) * 255.0
    std = images.new_tensor(normalization.std).view(1, 3, 1, 1) * 255.0
    pixels = images * std + mean
    if normalization.bgr:
        pixels = pixels.flip(1)
    return pixels.round().clamp(0, 255).to(torch.uint8)


class ExportedNetwork:
    """An exported file as a network of :mod:`rdd_lightning.inference`: normalised images in (converted back
    to uint8 pixels when the file has the normalisation baked in), its first output out, on the input's device.

    ``output_stride``: the card's for ``returns=logits_net`` (inference pads to it), else 1 (the file pads
    itself and returns input-size outputs).
    """

    def __init__(self, run: Callable[[Tensor], Tensor], card: ModelCard):
        self.run, self.card = run, card
        self.output_stride = card.output_stride if card.returns == "logits_net" else 1

    def __call__(self, images: Tensor) -> Tensor:
        x = pixels_of(images, self.card.normalization) if self.card.uint8_input else images.float()
        return self.run(x).to(images.device)


def file_kind(path: Path) -> str:
    """``onnx`` (by its suffix), ``torchscript`` (a zip archive with TorchScript code) or ``checkpoint``."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist()):
                return "torchscript"
    return "checkpoint"


def onnx_runner(path: Path) -> tuple[Callable[[Tensor], Tensor], dict[str, Any]]:
    """``(run, card data)`` of an ONNX file: ``run(x)`` is its first output on CPU (onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConfigError(
            f"ckpt_path={str(path)!r} is an ONNX file: install onnxruntime (pip install 'rdd-lightning[export]')"
        ) from err
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's many load errors
        raise ConfigError(f"cannot load ONNX file {str(path)!r}: {str(err)[:300]}") from err
    card = session.get_modelmeta().custom_metadata_map.get(CARD_KEY)
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run([output_name], {input_name: x.cpu().numpy()})[0])

    return run, json.loads(card) if card else {}


def torchscript_runner(path: Path, device: torch.device) -> tuple[Callable[[Tensor], Tensor], dict[str, Any]]:
    """``(run, card data)`` of a TorchScript file: ``run(x)`` is its first output."""
    extra = {CARD_KEY: ""}
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as err:  # TorchScript's load errors
        raise ConfigError(f"cannot load TorchScript file {str(path)!r}: {str(err)[:300]}") from err
    module.eval()

    def run(x: Tensor) -> Tensor:
        out = module(x.to(device))
        return out[0] if isinstance(out, tuple | list) else out

    return run, json.loads(extra[CARD_KEY]) if extra[CARD_KEY] else {}


def card_beside(path: Path, embedded: dict[str, Any]) -> ModelCard:
    """The card inside an exported file, else the ``<file>.json`` beside it."""
    if embedded:
        return ModelCard.from_dict(embedded, str(path))
    beside = Path(f"{path}.json")
    if not beside.is_file():
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds no model card and {str(beside)!r} does not exist; pass a file "
            f"written by rdd_lightning.export (with its .json beside it)"
        )
    return ModelCard.from_dict(json.loads(beside.read_text()), str(beside))


def checkpoint_data(
    ckpt_path: Path, metadata: Mapping[str, Any], dataset_cfg: Any | None
) -> tuple[Any | None, dict[str, Any] | None]:
    """``(datamodule, dataset config)`` giving a checkpoint's classes, palette and normalisation (the order
    of the module docstring), or ``(None, None)`` when nothing says."""
    run_dir = source_run_dir(ckpt_path)
    config = run_dataset_config(run_dir) if run_dir is not None else None
    if config is None and dataset_cfg is not None:
        config = OmegaConf.to_container(dataset_cfg, resolve=True)
    if config is None and metadata.get("dataset"):
        config = package_dataset_config(str(metadata["dataset"]))
    return (datamodule_of(config), config) if config is not None else (None, None)


@dataclass
class OpenedCheckpoint:
    """What :func:`open_checkpoint` found: the network (frozen, eval mode), its card, the file's contents, and
    the datamodule its classes came from (``None`` for a ``state_dict`` export, whose card says)."""

    net: nn.Module
    card: ModelCard
    checkpoint: dict[str, Any]
    datamodule: Any | None


def open_checkpoint(
    ckpt_path: Path, student_cfg: DictConfig | None = None, dataset_cfg: Any | None = None
) -> OpenedCheckpoint:
    """A checkpoint or weight file with its card. The network is rebuilt by
    :func:`rdd_lightning.teacher.rebuild_network` (``student_cfg``: the ``student=`` config, for files that
    record no network); classes, palette and normalisation come from the first source of the module
    docstring."""
    checkpoint = read_checkpoint(ckpt_path)
    metadata = checkpoint.get("rdd_lightning") or {}
    recorded = (metadata.get("student") or {}).get("num_classes")
    embedded = metadata.get("card")
    datamodule = None
    if embedded:
        card = ModelCard.from_dict(embedded, str(ckpt_path))
    else:
        datamodule, _ = checkpoint_data(ckpt_path, metadata, dataset_cfg)
        if datamodule is None:
            raise ConfigError(
                f"ckpt_path={str(ckpt_path)!r} records neither its dataset nor a run directory; pass "
                f"dataset=<the dataset it was trained on> (its classes, palette and normalisation)"
            )
        # a file trained on other inputs (a CIRKD file: caffe) gives garbage on these: refuse it, with the fix
        check_normalization(checkpoint, ckpt_path, "ckpt_path", datamodule.normalization)
        card = ModelCard(
            class_names=list(datamodule.class_names),
            palette=class_palette(datamodule).tolist(),
            normalization=datamodule.normalization,
            output_stride=1,
            dataset=datamodule.name,
            details=provenance(ckpt_path, checkpoint, source_run_dir(ckpt_path)),
        )
    if recorded is not None and recorded != card.num_classes:
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r} predicts {recorded} classes but its dataset {card.dataset!r} has "
            f"{card.num_classes}; pass dataset=<the dataset it was trained on>"
        )
    net = rebuild_network(ckpt_path, checkpoint, student_cfg, card.num_classes)
    card.output_stride = int(getattr(net, "output_stride", 1))
    return OpenedCheckpoint(net, card, checkpoint, datamodule)


def check_dataset_agrees(card: ModelCard, path: Path, dataset_cfg: Any | None) -> None:
    """A ``dataset=`` given with a file must have the file's class count; other names are only reported."""
    if dataset_cfg is None:
        return
    datamodule = datamodule_of(dataset_cfg)
    if datamodule.num_classes != card.num_classes:
        raise ConfigError(
            f"ckpt_path={str(path)!r} predicts {card.num_classes} classes (dataset {card.dataset!r}) but "
            f"dataset={datamodule.name} has {datamodule.num_classes}; use a dataset with its classes"
        )
    if list(datamodule.class_names) != card.class_names:
        log.warning(
            "ckpt_path=%s has classes %s, dataset=%s has %s",
            path,
            card.class_names,
            datamodule.name,
            datamodule.class_names,
        )


def load_model(
    ckpt_path: str | os.PathLike,
    *,
    student_cfg: DictConfig | None = None,
    dataset_cfg: Any | None = None,
    device: torch.device | str = "cpu",
) -> Segmenter:
    """Open ``ckpt_path`` (a checkpoint or weight file, or an export of any :data:`FORMATS`) on ``device``
    (ONNX files run on the CPU). ``dataset_cfg`` (the ``dataset=`` config, optional) must have its classes."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(ckpt_path)!r}: file not found")
    device = torch.device(device)
    kind = file_kind(path)
    if kind == "checkpoint":
        opened = open_checkpoint(path, student_cfg, dataset_cfg)
        check_dataset_agrees(opened.card, path, dataset_cfg)
        return Segmenter(opened.net.to(device), opened.card, path)
    if student_cfg is not None:
        raise ConfigError(f"ckpt_path={str(path)!r} is an exported {kind} file: leave student= out")
    run, embedded = onnx_runner(path) if kind == "onnx" else torchscript_runner(path, device)
    card = card_beside(path, embedded)
    check_dataset_agrees(card, path, dataset_cfg)
    return Segmenter(ExportedNetwork(run, card), card, path)


# ------------------------------------------------------------------------------------------------ export
class NetworkLogits(nn.Module):
    """A network's main logits (and, with ``with_aux``, its auxiliary logits) as plain tensors: the part of
    an exported graph that holds the network (traced for TorchScript)."""

    def __init__(self, net: nn.Module, with_aux: bool = False):
        super().__init__()
        self.net, self.with_aux = net, with_aux

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out = self.net(images)
        logits = getattr(out, "logits", out)
        return (logits, out.aux_logits) if self.with_aux else logits


class StandaloneSegmenter(nn.Module):
    """The exported network: ``images [B, 3, H, W]`` -> what ``returns`` says (:data:`RETURNS`).

    With ``normalization`` the input is ``uint8`` RGB pixels, normalised inside as the eval transform does
    (``(pixel - 255 mean) / (255 std)``, channels reversed first for a BGR network); without it the input is
    normalised ``float32``. For ``logits_input`` and ``class_map`` the image is zero-padded at the bottom/right
    to a multiple of ``output_stride`` (after normalising), and the logits are upsampled bilinearly
    (``align_corners=True``) and cropped back, exactly as :func:`rdd_lightning.inference.whole_image_logits`;
    ``logits_net`` needs sizes that are multiples of the stride and returns the network's own logits.
    ``core`` maps normalised images to logits (:class:`NetworkLogits`, or its trace). TorchScript-compatible.
    """

    def __init__(
        self, core: nn.Module, output_stride: int, returns: str, normalization: Normalization | None
    ):
        super().__init__()
        if returns not in RETURNS:
            raise ConfigError(f"returns={returns!r}: choose one of {list(RETURNS)}")
        self.core, self.stride, self.returns = core, int(output_stride), returns
        self.uint8_input = normalization is not None
        self.bgr = bool(normalization.bgr) if normalization is not None else False
        mean = torch.tensor(normalization.mean) * 255.0 if normalization is not None else torch.zeros(3)
        scale = (
            1.0 / (torch.tensor(normalization.std) * 255.0) if normalization is not None else torch.ones(3)
        )
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1).float())
        self.register_buffer("pixel_scale", scale.view(1, 3, 1, 1).float())

    def normalise(self, images: Tensor) -> Tensor:
        if not self.uint8_input:
            return images
        x = images.to(torch.float32)
        if self.bgr:
            x = x.flip([1])
        return (x - self.pixel_mean) * self.pixel_scale

    def pad(self, x: Tensor) -> Tensor:
        if self.returns == "logits_net":
            return x
        pad_h, pad_w = stride_padding(x.shape[2], x.shape[3], self.stride)
        return F.pad(x, [0, pad_w, 0, pad_h])

    def finish(self, logits: Tensor, padded: Tensor, size: list[int]) -> Tensor:
        if self.returns == "logits_net":
            return logits
        logits = resize_and_crop(logits, [padded.shape[2], padded.shape[3]], size)
        return logits.argmax(1) if self.returns == "class_map" else logits

    def forward(self, images: Tensor) -> Tensor:
        x = self.normalise(images)
        padded = self.pad(x)
        return self.finish(self.core(padded), padded, [x.shape[2], x.shape[3]])


class StandaloneSegmenterWithAux(StandaloneSegmenter):
    """:class:`StandaloneSegmenter` that also returns the auxiliary head's output in the same form (its
    ``core`` returns ``(logits, aux_logits)``)."""

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.normalise(images)
        padded = self.pad(x)
        logits, aux = self.core(padded)
        size = [x.shape[2], x.shape[3]]
        return self.finish(logits, padded, size), self.finish(aux, padded, size)


def standalone(
    net: nn.Module,
    returns: str,
    normalization: Normalization | None,
    with_aux: bool,
    core: nn.Module | None = None,
) -> StandaloneSegmenter:
    """The exportable form of ``net`` (``core``: a traced :class:`NetworkLogits` of it, for TorchScript)."""
    cls = StandaloneSegmenterWithAux if with_aux else StandaloneSegmenter
    stride = int(getattr(net, "output_stride", 1))
    return cls(
        core if core is not None else NetworkLogits(net, with_aux), stride, returns, normalization
    ).eval()


def top2_gap(logits: Tensor) -> Tensor:
    """``[B, H, W]``: the difference between the largest and second-largest logit of every pixel."""
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def near_tie_pixels(logits: Tensor, tolerance: float) -> np.ndarray:
    """``bool [B, H, W]``: pixels whose two best classes are within ``2 * tolerance`` (their argmax may differ
    between two runtimes that agree within ``tolerance``)."""
    return (top2_gap(logits) <= 2 * tolerance).cpu().numpy()

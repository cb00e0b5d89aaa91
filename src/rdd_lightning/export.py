"""Export a trained student alone: ``python -m rdd_lightning.export ckpt_path=<checkpoint>
[format=onnx|torchscript|state_dict|cirkd] [returns=logits_net|logits_input|class_map] [normalize=true]
[aux_head=true] [output=<file or folder>]``.

Composed by Hydra from ``conf/export.yaml``. The network of the checkpoint (opened by
:func:`rdd_lightning.deploy.open_checkpoint`, as ``predict`` opens it) is written without the teacher, the
objective or Lightning, and without its auxiliary head unless ``aux_head=true``: an ONNX file (opset
``opset``, dynamic batch, height and width) or a TorchScript file of
:class:`~rdd_lightning.deploy.StandaloneSegmenter`, or the bare weights (``state_dict``, loadable by
``build_model(**card["network"])``), or, for the ``cirkd_*`` networks, CIRKD's state dict (``cirkd``: CIRKD's
key names, the aux head kept as CIRKD's networks have it, nothing else in the file; CIRKD's ``eval.py
--pretrained`` loads it strictly). By default it goes to ``<run dir>/export/<checkpoint name>.<format
suffix>``. Beside it, ``<file>.json`` is its model card (also stored inside the file). Before it is moved
into place, the file is run (onnxruntime / TorchScript / rebuilt) on random images of each ``check_sizes``
size and compared with PyTorch eager: a difference above ``tolerance`` fails the export. Nothing that exists
is replaced unless ``overwrite=true``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from rdd_lightning import weight_formats
from rdd_lightning.data.images import image_size
from rdd_lightning.deploy import (
    CARD_KEY,
    FORMATS,
    RETURNS,
    ModelCard,
    OpenedCheckpoint,
    StandaloneSegmenter,
    file_kind,
    near_tie_pixels,
    onnx_runner,
    open_checkpoint,
    source_run_dir,
    standalone,
    torchscript_runner,
)
from rdd_lightning.errors import ConfigError, exit_on_config_error
from rdd_lightning.resume import write_json

log = logging.getLogger("rdd_lightning.export")

#: what ``format=`` writes: the deployable files (:data:`rdd_lightning.deploy.FORMATS`) and CIRKD's layout
EXPORT_FORMATS = (*FORMATS, "cirkd")
#: formats that write the network's weights alone (no returns=, no baked-in normalisation)
WEIGHT_FORMATS = ("state_dict", "cirkd")
SUFFIXES = {
    "onnx": ".onnx",
    "torchscript": ".torchscript.pt",
    "state_dict": ".state_dict.pt",
    "cirkd": ".cirkd.pth",
}


# ------------------------------------------------------------------------------------------------ settings
def check_settings(cfg: DictConfig) -> tuple[Path, str, str | None]:
    """``(checkpoint, format, returns)`` after checking every key, before any file is read."""
    if cfg.get("ckpt_path") in (None, ""):
        raise ConfigError(
            "ckpt_path is required: pass ckpt_path=<a checkpoint>, e.g. "
            "ckpt_path=logs/train/runs/<time>/checkpoints/best.ckpt"
        )
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt_path.is_file():
        raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r}: file not found")
    if file_kind(ckpt_path) != "checkpoint":
        raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r} is an exported file already; pass a checkpoint")
    fmt = str(cfg.format)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {list(EXPORT_FORMATS)}")
    returns = cfg.get("returns")
    if fmt in WEIGHT_FORMATS:
        if returns is not None or cfg.normalize:
            raise ConfigError(
                f"format={fmt} writes the network's weights alone: returns= and normalize=true apply to "
                "format=onnx|torchscript"
            )
        returns = None
    else:
        returns = "class_map" if returns is None else str(returns)
        if returns not in RETURNS:
            raise ConfigError(f"returns={returns!r}: choose one of {list(RETURNS)}")
    sizes = cfg.check_sizes
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ConfigError(f"check_sizes={list(sizes)}: give one or more [height, width] in pixels")
    return ckpt_path, fmt, returns


def target_path(cfg: DictConfig, ckpt_path: Path, fmt: str) -> Path:
    """Where the file goes: ``output`` (a file with the format's suffix, or a folder), else
    ``<run dir>/export/`` (the checkpoint's own folder when it is not in a run directory)."""
    name = ckpt_path.stem + SUFFIXES[fmt]
    if cfg.get("output") in (None, ""):
        return (source_run_dir(ckpt_path) or ckpt_path.parent) / "export" / name
    output = Path(str(cfg.output)).expanduser().resolve()
    if output.suffix in (".onnx", ".pt", ".pth"):
        if not output.name.endswith(SUFFIXES[fmt]) and not (
            fmt != "onnx" and output.suffix in (".pt", ".pth")
        ):
            raise ConfigError(f"output={str(cfg.output)!r}: a format={fmt} file ends with {SUFFIXES[fmt]}")
        return output
    return output / name


def check_free(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{str(existing[0])!r} exists; pass another output=<file or folder>, or overwrite=true to replace it"
        )


# ------------------------------------------------------------------------------------------------ card
def val_image_sizes(datamodule: Any) -> list[dict[str, Any]] | None:
    """Up to five most common ``{"size": [H, W], "images": n}`` of the validation split (headers only), or
    ``None`` when its files are not here."""
    if datamodule is None:
        return None
    try:
        dataset = datamodule.dataset_cls(datamodule.root, datamodule.splits["val"], labels=False)
        sizes = Counter(image_size(image) for image, _ in dataset.pairs)
    except ConfigError as err:
        log.info("validation image sizes not recorded: %s", err)
        return None
    return [{"size": list(size), "images": n} for size, n in sizes.most_common(5)]


def export_card(
    opened: OpenedCheckpoint, fmt: str, returns: str | None, normalize: bool, aux: bool, opset: int | None
) -> ModelCard:
    """The checkpoint's card for the exported file (the export's own details under ``export``)."""
    card = copy.deepcopy(opened.card)
    card.format = fmt
    card.returns = returns or "logits_net"  # state_dict: the network's own logits (its forward)
    card.uint8_input, card.aux_output = normalize, aux
    if card.details.get("network"):  # the exported network has the auxiliary head only when asked
        card.details["network"] = {**card.details["network"], "aux_head": aux}
    if card.details.get("validation") is not None and "image_sizes" not in card.details["validation"]:
        card.details["validation"]["image_sizes"] = val_image_sizes(opened.datamodule)
    card.details["export"] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rdd_lightning": version("rdd-lightning"),
        "torch": str(torch.__version__),
        "opset": opset if fmt == "onnx" else None,
    }
    return card


# ------------------------------------------------------------------------------------------------ writers
def example_images(card: ModelCard, batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random images of the file's input kind: uint8 pixels, or normalised-looking float32 values."""
    generator = torch.Generator().manual_seed(seed)
    if card.uint8_input:
        return torch.randint(0, 256, (batch, 3, height, width), generator=generator, dtype=torch.uint8)
    return torch.randn((batch, 3, height, width), generator=generator)


def output_names(card: ModelCard) -> list[str]:
    main = "classes" if card.returns == "class_map" else "logits"
    return [main, f"aux_{main}"] if card.aux_output else [main]


def write_onnx(model: StandaloneSegmenter, card: ModelCard, path: Path, opset: int) -> None:
    """``model`` as ONNX (torch.export; dynamic batch, height, width), the card in the file's metadata."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as err:
        raise ConfigError(
            "format=onnx needs onnx and onnxscript: pip install 'rdd-lightning[export]'"
        ) from err
    stride = card.output_stride
    batch = torch.export.Dim("batch", min=1, max=1024)
    if card.returns == "logits_net":  # the input must be a multiple of the stride
        height = stride * torch.export.Dim("height_in_strides", min=1, max=16384 // stride)
        width = stride * torch.export.Dim("width_in_strides", min=1, max=16384 // stride)
        example = example_images(card, 2, 8 * stride, 10 * stride)
    else:
        height = torch.export.Dim("height", min=2, max=16384)
        width = torch.export.Dim("width", min=2, max=16384)
        example = example_images(card, 2, 8 * stride + 3, 10 * stride + 5)
    messages = io.StringIO()
    quiet = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # the exporter's passes log every step at INFO
        logger.setLevel(logging.WARNING)
    with contextlib.redirect_stdout(messages), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes={"images": {0: batch, 2: height, 3: width}},
            input_names=["images"],
            output_names=output_names(card),
            opset_version=opset,
        )
    for logger, level in zip(quiet, levels, strict=True):
        logger.setLevel(level)
    log.debug("torch.onnx: %s", messages.getvalue())
    program.model.metadata_props[CARD_KEY] = json.dumps(card.to_dict())
    program.save(str(path), external_data=False)


def write_torchscript(net: torch.nn.Module, card: ModelCard, path: Path) -> None:
    """The network traced (its convolutions hold no size logic) inside a scripted
    :class:`StandaloneSegmenter` (whose padding and cropping follow every input size), card as an extra file."""
    core = standalone(net, card.returns, None, card.aux_output).core
    example = torch.randn(2, 3, 8 * card.output_stride, 8 * card.output_stride)
    with (
        warnings.catch_warnings()
    ):  # torch.jit is deprecated in favour of torch.export; TorchScript is asked for
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(core, example, check_trace=False)
        normalization = card.normalization if card.uint8_input else None
        scripted = torch.jit.script(
            standalone(net, card.returns, normalization, card.aux_output, core=traced)
        )
        torch.jit.save(scripted, str(path), _extra_files={CARD_KEY: json.dumps(card.to_dict())})


def write_cirkd(net: torch.nn.Module, path: Path) -> None:
    """The weights under CIRKD's names (:func:`rdd_lightning.weight_formats.to_cirkd_state_dict`), a plain
    state dict as CIRKD saves its checkpoints."""
    torch.save(weight_formats.to_cirkd_state_dict(net), path)


def check_cirkd_file(
    path: Path, net: torch.nn.Module, sizes: list[tuple[int, int]], tolerance: float
) -> dict:
    """Read the written CIRKD file back into a copy of ``net`` by CIRKD's names and compare its logits with
    ``net``'s on random images of each size: what CIRKD's loader would get."""
    rebuilt = copy.deepcopy(net)
    rebuilt.load_state_dict(weight_formats.network_state(torch.load(path, weights_only=True), rebuilt))
    worst = 0.0
    for index, (h, w) in enumerate(sizes):
        images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(index))
        with torch.no_grad():
            worst = max(worst, float((rebuilt(images).logits - net(images).logits).abs().max()))
    if worst > tolerance:
        raise RuntimeError(f"{path}: read back, the logits differ by {worst:.3g} (tolerance {tolerance})")
    return {"sizes": [list(s) for s in sizes], "tolerance": tolerance, "max_abs_diff": worst}


def write_state_dict(net: torch.nn.Module, opened: OpenedCheckpoint, card: ModelCard, path: Path) -> None:
    """The weights (``state_dict``) with the records ``rebuild_network`` reads and the card."""
    metadata = dict(opened.checkpoint.get("rdd_lightning") or {})
    network = dict(metadata.get("network") or {})
    if network:
        network["aux_head"] = card.aux_output
    describe = net.describe() if hasattr(net, "describe") else metadata.get("student")
    record = {**metadata, "network": network or None, "student": describe, "card": card.to_dict()}
    torch.save({"state_dict": net.state_dict(), "rdd_lightning": record}, path)


# ------------------------------------------------------------------------------------------------ check
def check_sizes(cfg: DictConfig, card: ModelCard) -> list[tuple[int, int]]:
    """The sizes the file is checked at (rounded up to the stride for ``logits_net``)."""
    multiple = card.output_stride if card.returns == "logits_net" or card.format == "cirkd" else 1
    return [
        (-(-int(h) // multiple) * multiple, -(-int(w) // multiple) * multiple) for h, w in cfg.check_sizes
    ]


def first_output(out: Any) -> torch.Tensor:
    """The main output of a network: the first of a tuple, the logits of a ``SegOutput``."""
    out = out[0] if isinstance(out, tuple | list) else out
    return getattr(out, "logits", out)


def file_runner(path: Path, fmt: str):
    """``x -> first output`` of a written file, as ``predict`` would run it (on the CPU)."""
    if fmt == "onnx":
        return onnx_runner(path)[0]
    if fmt == "torchscript":
        return torchscript_runner(path, torch.device("cpu"))[0]
    rebuilt = open_checkpoint(path).net
    return lambda x: first_output(rebuilt(x))


def compare(
    path: Path,
    fmt: str,
    eager: torch.nn.Module,
    card: ModelCard,
    sizes: list[tuple[int, int]],
    tolerance: float,
) -> dict[str, Any]:
    """Run the written file on random images of each size (batch 2 for the first, then 1) and compare its main
    output with ``eager``'s: logits within ``tolerance``; class maps equal wherever the eager logits' two
    best classes are more than ``2 * tolerance`` apart. A difference raises a RuntimeError naming the size."""
    run = file_runner(path, fmt)
    class_maps = card.returns == "class_map" and fmt != "state_dict"
    worst, near_ties = 0.0, 0
    for index, (h, w) in enumerate(sizes):
        images = example_images(card, 2 if index == 0 else 1, h, w, seed=index)
        with torch.no_grad():
            expected, got = first_output(eager(images)), run(images)
        if got.shape != expected.shape:
            raise RuntimeError(
                f"{path}: output {tuple(got.shape)} at {h}x{w}, PyTorch gives {tuple(expected.shape)}"
            )
        if class_maps:
            with torch.no_grad():
                logits = standalone(eager.core.net, "logits_input", None, False)(eager.normalise(images))
            differ = (got != expected).numpy()
            wrong = differ & ~near_tie_pixels(logits, tolerance)
            if wrong.any():
                raise RuntimeError(
                    f"{path}: {int(wrong.sum())} pixels of a {h}x{w} image get another class than in PyTorch"
                )
            near_ties += int(differ.sum())
        else:
            diff = float((got.float() - expected.float()).abs().max())
            worst = max(worst, diff)
            if diff > tolerance:
                raise RuntimeError(
                    f"{path}: outputs differ from PyTorch by {diff:.3g} at {h}x{w} (tolerance {tolerance})"
                )
    result: dict[str, Any] = {"sizes": [list(s) for s in sizes], "tolerance": tolerance}
    result["pixels_differing_at_near_ties" if class_maps else "max_abs_diff"] = (
        near_ties if class_maps else worst
    )
    return result


# ------------------------------------------------------------------------------------------------ run
def run(cfg: DictConfig) -> dict[str, Any]:
    """Export as ``cfg`` says; return the written file's card (as ``<file>.json`` holds it)."""
    ckpt_path, fmt, returns = check_settings(cfg)
    path = target_path(cfg, ckpt_path, fmt)
    card_path = Path(f"{path}.json")
    check_free([path, card_path], bool(cfg.overwrite))
    opened = open_checkpoint(ckpt_path, cfg.get("student"), cfg.get("dataset"))
    net = copy.deepcopy(opened.net).eval()
    # CIRKD's ResNet networks have the aux layer and its loader is strict: the file keeps what the network has
    aux = getattr(net, "aux_head", None) is not None if fmt == "cirkd" else bool(cfg.aux_head)
    if fmt == "cirkd" and weight_formats.cirkd_names(net) is None:
        described = net.describe() if hasattr(net, "describe") else {}
        raise ConfigError(
            f"format=cirkd: the network of ckpt_path={str(ckpt_path)!r} ({described.get('arch')} over "
            f"{described.get('encoder_name')!r}) is not one of CIRKD's; only the cirkd_* networks have CIRKD's "
            f"layout (format=state_dict writes any network)"
        )
    if aux and getattr(net, "aux_head", None) is None:
        raise ConfigError(f"aux_head=true: the network of ckpt_path={str(ckpt_path)!r} has no auxiliary head")
    if not aux and hasattr(net, "aux_head"):
        net.aux_head = None
    card = export_card(opened, fmt, returns, bool(cfg.normalize), aux, int(cfg.opset))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    eager = standalone(net, card.returns, card.normalization if card.uint8_input else None, aux)
    try:
        if fmt == "onnx":
            write_onnx(eager, card, tmp, int(cfg.opset))
        elif fmt == "torchscript":
            write_torchscript(net, card, tmp)
        elif fmt == "cirkd":
            write_cirkd(net, tmp)
        else:
            write_state_dict(net, opened, card, tmp)
        sizes, tolerance = check_sizes(cfg, card), float(cfg.tolerance)
        if fmt == "cirkd":
            card.details["export"]["check"] = check_cirkd_file(tmp, net, sizes, tolerance)
        else:
            reference = eager if fmt != "state_dict" else net
            card.details["export"]["check"] = compare(tmp, fmt, reference, card, sizes, tolerance)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    data = card.to_dict()
    write_json(card_path, data)
    log.info("%s -> %s (%s, returns %s; card %s)", ckpt_path, path, fmt, card.returns, card_path)
    return {**data, "file": str(path), "card_file": str(card_path)}


@hydra.main(version_base="1.3", config_path="pkg://rdd_lightning.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    exit_on_config_error(lambda: run(cfg), log)


if __name__ == "__main__":
    main()

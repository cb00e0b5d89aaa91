"""Networks and images for the prediction, export and submission tests, and the tests' own (independent)
reference of whole-image inference.

A network trained for a few steps on tiny data predicts one class everywhere, which would let wrong pixels go
unnoticed. :func:`varied_network` gives a freshly initialised one whose BatchNorm statistics are measured on
random images, so its classes change from pixel to pixel while its logits stay of order 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rdd_lightning.data.transforms import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD
from rdd_lightning.models import build_model

TINY_NETWORK = {
    "arch": "DeepLabV3",
    "encoder_name": "resnet18",
    "encoder_weights": None,
    "aux_head": True,
    "encoder_output_stride": 8,
    "decoder_channels": 32,
    "upsampling": 1,
}


def blocky_image(rng: np.random.Generator, height: int, width: int, block: int = 8) -> np.ndarray:
    """``uint8 [H, W, 3]`` random colour blocks of ``block`` pixels (cropped to the size)."""
    cells = rng.integers(0, 256, (-(-height // block), -(-width // block), 3))
    return np.kron(cells, np.ones((block, block, 1)))[:height, :width].astype(np.uint8)


def write_images(folder: Path, specs: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Blocky PNGs ``folder/<name>`` of the given ``(H, W)``; returns ``{name: pixels}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (h, w) in specs.items():
        pixels = blocky_image(rng, h, w)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / name)
        out[name] = pixels
    return out


def normalise(pixels: np.ndarray, normalization: str) -> torch.Tensor:
    """``[1, 3, H, W]`` network input of ``uint8 [H, W, 3]`` RGB pixels, written out by hand: ``caffe`` is BGR
    minus the mean pixel, ``imagenet`` is RGB ``(p / 255 - mean) / std``."""
    if normalization == "caffe":
        x = pixels[..., ::-1].astype(np.float32) - np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)
    else:
        x = (pixels.astype(np.float32) / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1)[None]


@torch.no_grad()
def reference_logits(
    net: torch.nn.Module, x: torch.Tensor, stride: int = 8, head: str = "logits"
) -> torch.Tensor:
    """Whole-image logits ``[B, C, H, W]`` of the main head (``head="aux_logits"``: the auxiliary one):
    zero-pad bottom/right to the stride, forward, upsample the logits (bilinear, align_corners) to the padded
    size, crop."""
    h, w = x.shape[-2:]
    ph, pw = -(-h // stride) * stride, -(-w // stride) * stride
    logits = getattr(net(F.pad(x, (0, pw - w, 0, ph - h))), head)
    return F.interpolate(logits, size=(ph, pw), mode="bilinear", align_corners=True)[..., :h, :w]


def assert_same_classes(got: np.ndarray, logits: torch.Tensor, tolerance: float = 1e-4) -> None:
    """``got`` (class ids ``[H, W]``) is the argmax of ``logits [1, C, H, W]`` at every pixel whose two best
    logits are more than ``2 * tolerance`` apart (and such pixels are nearly all of them)."""
    top = logits[0].topk(2, dim=0).values
    decided = ((top[0] - top[1]) > 2 * tolerance).numpy()
    assert decided.mean() > 0.99
    expected = logits[0].argmax(0).numpy()
    assert np.array_equal(got[decided], expected[decided])


def varied_network(
    num_classes: int, normalization: str = "imagenet", seed: int = 0, network: dict | None = None
) -> torch.nn.Module:
    """A fresh network (``network``: build_model arguments, default :data:`TINY_NETWORK`) in eval mode whose
    BatchNorm statistics were measured on four random blocky 64x64 images under ``normalization``."""
    torch.manual_seed(seed)
    net = build_model(**{**TINY_NETWORK, **(network or {}), "num_classes": num_classes})
    rng = np.random.default_rng(seed)
    images = torch.cat([normalise(blocky_image(rng, 64, 64), normalization) for _ in range(4)])
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average of the batches seen
            module.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(images)
    return net.eval()


def save_checkpoint(
    net: torch.nn.Module, path: Path, *, dataset: str | None, network: dict | None, base: dict | None = None
) -> Path:
    """``net`` as a checkpoint of this package (``base``: another checkpoint whose other entries are kept)."""
    checkpoint = dict(base or {})
    checkpoint["state_dict"] = {f"student.{k}": v for k, v in net.state_dict().items()}
    record = dict(checkpoint.get("rdd_lightning") or {})
    record.update({"student": net.describe(), "dataset": dataset, "network": network})
    checkpoint["rdd_lightning"] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def network_of(ckpt_path: str | Path, num_classes: int) -> torch.nn.Module:
    """The network of a checkpoint, built by hand from its record (not through the package's loader)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    spec = checkpoint["rdd_lightning"]["network"]
    net = build_model(**{**spec, "num_classes": num_classes})
    state = checkpoint["state_dict"]
    net.load_state_dict({k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")})
    return net.eval()

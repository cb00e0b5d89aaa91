"""Whole-image, sliding-window and multi-scale + flip inference (rdd_lightning.inference), on CPU."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from rdd_lightning.errors import ConfigError
from rdd_lightning.inference import (
    InferenceConfig,
    predict_logits,
    sliding_window_logits,
    whole_image_logits,
    window_boxes,
    window_starts,
)
from rdd_lightning.models import SegOutput, build_model
from rdd_lightning.module import DistillationModule

NUM_CLASSES = 3


class PixelNet(nn.Module):
    """A 1x1 convolution: output stride 1, the same logits for a pixel whatever window it is seen in."""

    output_stride = 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, NUM_CLASSES, 1)

    def forward(self, x):
        return SegOutput(logits=self.conv(x), aux_logits=None, features=[x])


class StridedNet(nn.Module):
    """Average-pools by 4 then a 1x1 conv; records the input sizes it is given."""

    output_stride = 4

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, NUM_CLASSES, 1)
        self.seen: list[tuple[int, int]] = []

    def forward(self, x):
        assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0, x.shape
        self.seen.append(tuple(x.shape[-2:]))
        return self.conv(F.avg_pool2d(x, 4))  # a bare tensor works as well as a SegOutput


class ConvNet(nn.Module):
    """Three stride-2 3x3 convolutions (output stride 8, zero-padded borders, not flip-symmetric): cheap,
    with the border effects that make windows and flips matter."""

    output_stride = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, NUM_CLASSES, 3, stride=2, padding=1),
        )

    def forward(self, x):
        return SegOutput(logits=self.body(x), aux_logits=None, features=[x])


@pytest.fixture(scope="module")
def convnet():
    return ConvNet().eval()


@pytest.fixture(scope="module")
def deeplab():
    torch.manual_seed(0)
    net = build_model(
        "DeepLabV3",
        "resnet18",
        NUM_CLASSES,
        aux_head=True,
        encoder_output_stride=8,
        decoder_channels=16,
        upsampling=1,
    )
    return net.eval()


def images(h: int = 30, w: int = 45, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


# ------------------------------------------------------------------------------------------------ whole
def test_whole_pads_to_the_stride_and_crops_back():
    net = StridedNet()
    x = images(30, 45)
    logits = whole_image_logits(net, x)
    assert logits.shape == (2, NUM_CLASSES, 30, 45) and logits.dtype == torch.float32
    assert net.seen == [(32, 48)]  # zero-padded at the bottom/right to multiples of 4
    padded = F.pad(x, (0, 3, 0, 2))
    expected = F.interpolate(net(padded), size=(32, 48), mode="bilinear", align_corners=True)[..., :30, :45]
    assert torch.equal(logits, expected)  # the top-left pixels are the padded image's


def test_whole_on_a_real_network_with_odd_size(deeplab):
    assert whole_image_logits(deeplab, images(30, 45)).shape == (2, NUM_CLASSES, 30, 45)


# ------------------------------------------------------------------------------------------------ slide
@pytest.mark.parametrize(
    "length,window,stride", [(45, 16, 11), (32, 16, 16), (30, 16, 8), (10, 16, 5), (17, 16, 1)]
)
def test_window_starts_cover_and_end_at_the_border(length, window, stride):
    starts = window_starts(length, window, stride)
    size = min(window, length)
    assert starts[0] == 0 and starts[-1] + size == length  # the last window is aligned to the border
    assert starts == sorted(set(starts)) and all(
        b - a <= stride for a, b in zip(starts, starts[1:], strict=False)
    )
    covered = torch.zeros(length, dtype=torch.int64)
    for s in starts:
        covered[s : s + size] += 1
    assert (covered > 0).all()


def test_window_boxes_count_map():
    boxes = window_boxes((30, 45), (16, 16), (11, 11))
    count = torch.zeros(30, 45)
    for top, bottom, left, right in boxes:
        assert bottom - top == 16 and right - left == 16
        count[top:bottom, left:right] += 1
    assert count.min() >= 1 and count[0, 0] == 1 and count[12, 12] == 4  # overlaps counted
    assert window_boxes((10, 45), (16, 16), (8, 8))[0] == (0, 10, 0, 16)  # shrunk to a small image


def test_slide_with_a_window_larger_than_the_image_is_whole(deeplab):
    x = images(30, 45)
    assert torch.equal(sliding_window_logits(deeplab, x, (64, 64), (32, 32)), whole_image_logits(deeplab, x))
    cfg = {"mode": "slide", "window": [48, 48], "stride": [16, 16]}
    assert torch.equal(predict_logits(deeplab, x, cfg), whole_image_logits(deeplab, x))


def test_slide_equals_whole_for_a_pixelwise_network():
    net, x = PixelNet(), images(30, 45)
    slide = sliding_window_logits(net, x, (16, 16), (11, 11))
    assert slide.shape == (2, NUM_CLASSES, 30, 45)
    torch.testing.assert_close(slide, whole_image_logits(net, x), rtol=0, atol=1e-6)


def test_slide_averages_overlapping_windows():
    class Ones(nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], NUM_CLASSES, *x.shape[-2:])

    out = sliding_window_logits(Ones(), images(30, 45), (16, 16), (5, 7))
    assert torch.equal(out, torch.ones_like(out))  # sum / count is exactly 1 wherever windows overlap


def test_slide_with_windows_smaller_than_the_image(convnet):
    x = images(40, 56)
    slide = predict_logits(convnet, x, {"mode": "slide", "window": [24, 24], "stride": [16, 16]})
    assert slide.shape == (2, NUM_CLASSES, 40, 56) and slide.isfinite().all()


def test_slide_pads_windows_to_the_stride():
    net = StridedNet()
    out = sliding_window_logits(net, images(30, 45), (18, 18), (9, 9))
    assert out.shape == (2, NUM_CLASSES, 30, 45) and set(net.seen) == {(20, 20)}


# ------------------------------------------------------------------------------------------------ multi-scale, flip
def test_single_scale_without_flip_is_whole(convnet):
    x = images(30, 45)
    expected = whole_image_logits(convnet, x)
    assert torch.equal(predict_logits(convnet, x, {"scales": [1.0], "flip": False}), expected)
    assert torch.equal(predict_logits(convnet, x), expected)
    assert torch.equal(
        predict_logits(convnet, x, OmegaConf.create({"mode": "whole", "scales": [1.0]})), expected
    )


def test_views_average_probabilities():
    net, x = PixelNet(), images(30, 45)
    merged = predict_logits(net, x, {"scales": [1.0, 1.0]})  # two identical views
    torch.testing.assert_close(merged, whole_image_logits(net, x).log_softmax(1), rtol=0, atol=1e-5)
    flipped = predict_logits(net, x, {"flip": True})  # a pixelwise net is flip-equivariant
    torch.testing.assert_close(flipped, whole_image_logits(net, x).log_softmax(1), rtol=0, atol=1e-5)


def test_flip_is_symmetric(convnet):
    x = images(32, 40)
    cfg = {"flip": True}
    torch.testing.assert_close(
        predict_logits(convnet, x.flip(-1), cfg).flip(-1), predict_logits(convnet, x, cfg)
    )


def test_multi_scale_returns_input_size_log_probabilities(convnet):
    x = images(30, 45)
    out = predict_logits(convnet, x, {"scales": [0.5, 0.75, 1.0, 1.5], "flip": True})
    assert out.shape == (2, NUM_CLASSES, 30, 45)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, 30, 45))
    slide = predict_logits(convnet, x, {"mode": "slide", "window": [24, 24], "scales": [0.75, 1.25]})
    assert slide.shape == (2, NUM_CLASSES, 30, 45) and slide.isfinite().all()


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_and_plain_values():
    cfg = InferenceConfig.from_any(None)
    assert cfg.to_dict() == {"mode": "whole", "window": None, "stride": None, "scales": [1.0], "flip": False}
    slide = InferenceConfig.from_any({"mode": "slide", "window": 24})
    assert slide.window == (24, 24) and slide.stride == (16, 16)  # default stride: 2/3 of the window
    assert slide.to_dict()["window"] == [24, 24]


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"mode": "tiles"}, "inference.mode='tiles'"),
        ({"mode": "slide"}, "inference.window"),
        ({"mode": "slide", "window": [16, 16], "stride": [20, 8]}, "exceeds"),
        ({"window": [16, 0]}, "inference.window"),
        ({"scales": [1.0, -0.5]}, "inference.scales"),
        ({"scales": []}, "inference.scales"),
        ({"flipp": True}, "unknown key"),
    ],
)
def test_config_errors_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        InferenceConfig.from_any(cfg)


def test_module_validates_with_its_inference_setting(convnet):
    module = DistillationModule(
        student=convnet,
        teacher=None,
        objective=None,
        optimizer=None,
        scheduler=None,
        num_classes=NUM_CLASSES,
        class_names=["a", "b", "c"],
        inference=InferenceConfig(mode="slide", window=(24, 24)),
    )
    assert module.hparams["inference"] == {
        "mode": "slide",
        "window": [24, 24],
        "stride": [16, 16],
        "scales": [1.0],
        "flip": False,
    }
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # plain values: checkpoints stay loadable with weights_only
    x = images(40, 56)
    expected = sliding_window_logits(convnet, x, (24, 24), (16, 16))
    assert torch.equal(module.predict_logits(x), expected)
    mask = torch.zeros(2, 40, 56, dtype=torch.int64)
    preds = module.evaluation_step({"image": x, "mask": mask})
    assert torch.equal(preds, expected.argmax(1))
    default = DistillationModule(
        student=convnet,
        teacher=None,
        objective=None,
        optimizer=None,
        scheduler=None,
        num_classes=NUM_CLASSES,
        class_names=["a", "b", "c"],
    )
    assert torch.equal(default.predict_logits(x), whole_image_logits(convnet, x))

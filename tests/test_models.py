"""Model factory: outputs, parameter counts of the paper's networks, encoder weights."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from rdd_lightning.errors import ConfigError
from rdd_lightning.models import SegmentationNet, SegOutput, build_model, count_parameters
from tests.conftest import compose_train_cfg


def build(tmp_path, group: str, option: str, num_classes: int = 19, **extra) -> SegmentationNet:
    cfg = compose_train_cfg(tmp_path, [f"{group}={option}", f"{group}.encoder_weights=null"])
    return instantiate(cfg[group], num_classes=num_classes, **extra)


@pytest.mark.parametrize(
    "option,millions,has_aux",
    [("resnet18", 13.6, True), ("resnet101", 61.1, True)],
)
def test_paper_parameter_counts(tmp_path, option, millions, has_aux):
    net = build(tmp_path, "student", option)
    assert (net.aux_head is not None) == has_aux
    assert count_parameters(net) == pytest.approx(millions * 1e6, rel=0.05)


@pytest.mark.parametrize("option", ["resnet18", "resnet18_scratch", "mobilenet_v2", "pspnet_resnet18"])
def test_students_return_segoutput_at_one_eighth(tmp_path, option):
    net = build(tmp_path, "student", option, num_classes=5).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 96))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 5, 8, 12)
    assert net.output_stride == 8
    if option == "mobilenet_v2":
        assert out.aux_logits is None
    else:
        assert out.aux_logits.shape == (2, 5, 8, 12)
    assert len(out.features) == 6


def test_teacher_config_builds_the_teacher_architecture(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["teacher=resnet101"])
    assert cfg.teacher.encoder_name == "resnet101" and cfg.teacher.decoder_channels == 256
    assert cfg.teacher.encoder_weights is None


def test_any_smp_architecture(tmp_path):
    net = build_model("Unet", "resnet18", num_classes=3, aux_head=True)
    out = net(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 3, 64, 64) and out.aux_logits.shape[1] == 3


def test_wrong_input_size_is_reported():
    net = build_model("DeepLabV3", "resnet18", num_classes=3, encoder_output_stride=8, upsampling=1)
    with pytest.raises(RuntimeError, match="divisible by 8"):
        net(torch.randn(2, 3, 60, 64))


def test_bad_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="resnet9000"):
        build_model("DeepLabV3", "resnet9000", num_classes=3)


def test_local_encoder_weights_file(tmp_path):
    donor = build_model("DeepLabV3", "resnet18", num_classes=3)
    path = tmp_path / "resnet18.pth"
    state = donor.net.encoder.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # torchvision layout
    torch.save(state, path)
    net = build_model("DeepLabV3", "resnet18", num_classes=3, encoder_weights=str(path))
    for key, value in donor.net.encoder.state_dict().items():
        assert torch.equal(net.net.encoder.state_dict()[key], value), key


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        build_model("DeepLabV3", "resnet18", num_classes=3, encoder_weights=str(tmp_path / "nope.pth"))


def test_weights_file_of_another_encoder(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(build_model("DeepLabV3", "resnet34", num_classes=3).net.encoder.state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit encoder 'resnet18'"):
        build_model("DeepLabV3", "resnet18", num_classes=3, encoder_weights=str(path))


def test_offline_imagenet_fails_fast_with_instructions(tmp_path, monkeypatch):
    """Not in the cache and the Hub unreachable: a ConfigError at once, without smp's retrying download."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr("rdd_lightning.models._reachable", lambda url, timeout=3.0: False)

    def no_download(*args, **kwargs):
        raise AssertionError("must not try to download when the Hub is unreachable")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)
    with pytest.raises(ConfigError) as err:
        build_model("DeepLabV3", "resnet18", num_classes=3, encoder_weights="imagenet")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message and "encoder_weights=null" in message
    assert ".pth" in message


def test_reachability_probe_answers_for_a_closed_port():
    from rdd_lightning.models import _reachable

    assert _reachable("http://127.0.0.1:9", timeout=1.0) is False


def test_unknown_weight_name(tmp_path):
    with pytest.raises(ConfigError, match="known names"):
        build_model("DeepLabV3", "resnet18", num_classes=3, encoder_weights="instagram-of-cats")


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50", "mobilenet_v2"])
def test_zero_init_residual_makes_every_residual_block_the_identity(encoder):
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    plain = build_model("DeepLabV3", encoder, 3, aux_head=False)
    torch.manual_seed(0)
    zeroed = build_model("DeepLabV3", encoder, 3, aux_head=False, zero_init_residual=True)
    blocks = [
        m for m in zeroed.net.encoder.modules() if isinstance(m, (BasicBlock, Bottleneck, InvertedResidual))
    ]
    identity_blocks = [
        m
        for m in blocks
        if (getattr(m, "downsample", None) is None and not isinstance(m, InvertedResidual))
        or (isinstance(m, InvertedResidual) and m.use_res_connect)
    ]
    assert identity_blocks
    zeroed.eval()
    for block in identity_blocks:
        channels = next(p for p in block.parameters()).shape[1]
        x = torch.rand(1, channels, 4, 4)  # non-negative: what a ResNet block receives after a ReLU
        assert torch.equal(block(x), x)
    # only those BatchNorm weights differ from the default initialisation
    changed = [k for k, v in zeroed.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed and all(k.endswith(".weight") and ("bn" in k or ".conv." in k) for k in changed)


def test_zero_init_residual_on_an_encoder_without_residual_blocks_names_the_option():
    with pytest.raises(ConfigError, match="zero_init_residual"):
        build_model("Unet", "vgg11", 3, aux_head=False, zero_init_residual=True)


def test_zero_init_residual_follows_the_dataset_recipe(tmp_path):
    synthetic = compose_train_cfg(tmp_path, [])
    camvid = compose_train_cfg(tmp_path, ["dataset=camvid"])
    assert synthetic.student.zero_init_residual and synthetic.teacher.zero_init_residual
    assert not camvid.student.zero_init_residual and not camvid.teacher.zero_init_residual

"""The paper's networks (``cirkd_*`` configs) against an independent implementation in CIRKD's key layout
(tests/cirkd_reference.py): logits, parameter counts, CIRKD's whole-network and ImageNet-backbone files
wherever the package loads weights (teacher, encoder, evaluate), strict loading with one-line errors, the
export back to CIRKD's layout, and training with a CIRKD teacher file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from rdd_lightning import weight_formats
from rdd_lightning.errors import ConfigError, find_config_error
from rdd_lightning.models import count_parameters
from rdd_lightning.teacher import load_teacher
from tests.cirkd_reference import ReferenceNet, randomize_
from tests.conftest import TINY, compose_train_cfg

KINDS = ["deeplabv3_resnet18", "deeplabv3_resnet101", "deeplabv3_mobilenetv2", "pspnet_resnet18"]
CLASSES = 11  # the synthetic dataset's, so the files also serve as teachers / evaluate checkpoints below


def network_config(option: str, **overrides):
    """``student/<option>`` as composed by the package (weights from files, so encoder_weights=null)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"student={option}", "student.encoder_weights=null"])
    GlobalHydra.instance().clear()
    return instantiate(cfg.student, num_classes=CLASSES, **overrides)


@pytest.fixture(scope="module")
def cirkd_files(tmp_path_factory):
    """``{kind: (reference network, path of its state dict in CIRKD's layout)}``; the R101 file is saved with
    DDP's ``module.`` prefix, as a checkpoint saved from a wrapped network is."""
    folder = tmp_path_factory.mktemp("cirkd")
    files = {}
    for seed, kind in enumerate(KINDS):
        ref = randomize_(ReferenceNet(kind, CLASSES), seed=seed, size=(64, 96))
        state = ref.state_dict()
        if kind == "deeplabv3_resnet101":
            state = {f"module.{k}": v for k, v in state.items()}
        path = folder / f"{kind}_citys_best_model.pth"
        torch.save(state, path)
        files[kind] = (ref, path)
    return files


# ------------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("kind", KINDS)
def test_cirkd_file_loads_and_matches_the_independent_network(cirkd_files, kind):
    ref, path = cirkd_files[kind]
    net = load_teacher(network_config(f"cirkd_{kind}"), path, choice=f"cirkd_{kind}")
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, aux = ref(x)
        out = net(x)
    assert out.logits.shape == (2, CLASSES, 8, 12)
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=0)
    if aux is None:
        assert out.aux_logits is None
    else:
        torch.testing.assert_close(out.aux_logits, aux, atol=1e-4, rtol=0)
    assert count_parameters(net) == count_parameters(ref)


def test_parameter_counts_are_the_published_ones():
    """CIRKD's paper: the R101 teacher 61.1 M, DeepLabV3-R18 13.6 M (19 classes, aux heads included)."""
    with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
        counts = {
            option: count_parameters(
                instantiate(
                    compose(
                        config_name="train", overrides=[f"student={option}", "student.encoder_weights=null"]
                    ).student,
                    num_classes=19,
                )
            )
            for option in ("cirkd_deeplabv3_resnet18", "cirkd_deeplabv3_resnet101")
        }
    GlobalHydra.instance().clear()
    assert round(counts["cirkd_deeplabv3_resnet18"] / 1e6, 1) == 13.6
    assert round(counts["cirkd_deeplabv3_resnet101"] / 1e6, 1) == 61.1
    assert counts["cirkd_deeplabv3_resnet101"] == count_parameters(ReferenceNet("deeplabv3_resnet101", 19))


def test_training_dropouts_are_cirkds():
    """Dropout 0.5 after the ASPP projection and 0.1 before the classifier and in the aux head, as CIRKD trains."""
    net = network_config("cirkd_deeplabv3_resnet18")
    rates = sorted(m.p for m in net.modules() if isinstance(m, torch.nn.Dropout))
    assert rates == [0.1, 0.1, 0.5]
    psp = network_config("cirkd_pspnet_resnet18")
    assert sorted(m.p for m in psp.modules() if isinstance(m, torch.nn.Dropout)) == [0.1, 0.1]


@pytest.mark.parametrize("kind", ["deeplabv3_resnet18", "deeplabv3_mobilenetv2"])
def test_imagenet_backbone_file_loads_into_the_encoder(tmp_path, cirkd_files, kind):
    """CIRKD's ImageNet files hold the classifier too (ResNet ``fc.*``; MobileNetV2 its last 1x1 conv
    ``features.18.*`` and ``classifier.1.*``): dropped; every backbone tensor is loaded."""
    ref, _ = cirkd_files[kind]
    backbone = ref.pretrained.net if kind.endswith("mobilenetv2") else ref.pretrained
    state = dict(backbone.state_dict())
    if kind.endswith("mobilenetv2"):
        state.update(
            {
                "features.18.0.weight": torch.zeros(1280, 320, 1, 1),
                "classifier.1.weight": torch.zeros(1000, 1280),
            }
        )
    else:
        state.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    net = network_config(f"cirkd_{kind}", encoder_weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = net.net.encoder(x)
        expected = ref.pretrained(x)
    if kind.endswith("mobilenetv2"):
        torch.testing.assert_close(features[-1], expected, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(features[-2], expected[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(features[-1], expected[1], atol=1e-5, rtol=0)


def test_backbone_file_missing_a_tensor_fails_with_one_line(tmp_path, cirkd_files):
    ref, _ = cirkd_files["deeplabv3_resnet18"]
    state = dict(ref.pretrained.state_dict())
    del state["layer4.1.bn2.running_var"]
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    with pytest.raises(Exception) as err:  # Hydra's instantiate wraps it; the entry points print this cause
        network_config("cirkd_deeplabv3_resnet18", encoder_weights=str(path))
    message = str(find_config_error(err.value))
    assert "\n" not in message and str(path) in message and "tu-resnet18" in message
    assert (
        "CIRKD's backbone layout" in message and "1 tensor(s) missing (layer4.1.bn2.running_var)" in message
    )


def test_sync_batchnorm_keeps_mobilenets_fused_activations():
    """trainer.sync_batchnorm=true converts the student's BatchNorm layers; MobileNetV2's BN + ReLU6 layers
    (timm's BatchNormAct2d) must keep their activation: in eval mode the converted network computes the same."""
    from rdd_lightning.models import to_sync_batchnorm

    net = network_config("cirkd_deeplabv3_mobilenetv2").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = net(x).logits
        converted = to_sync_batchnorm(net).eval()
        assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
        torch.testing.assert_close(converted(x).logits, before, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ strict loading
def test_whole_file_missing_a_tensor_fails_with_one_line(tmp_path, cirkd_files):
    ref, _ = cirkd_files["pspnet_resnet18"]
    state = dict(ref.state_dict())
    del state["head.psp.conv3.1.weight"]
    path = tmp_path / "psp.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        load_teacher(network_config("cirkd_pspnet_resnet18"), path, choice="cirkd_pspnet_resnet18")
    message = str(err.value)
    assert "\n" not in message
    assert f"teacher.checkpoint={str(path)!r} does not fit teacher=cirkd_pspnet_resnet18" in message
    assert "1 tensor(s) missing (head.psp.conv3.1.weight)" in message


def test_file_of_another_network_names_the_config_it_fits(cirkd_files):
    _, path = cirkd_files["deeplabv3_resnet18"]
    with pytest.raises(ConfigError) as err:
        load_teacher(network_config("cirkd_deeplabv3_resnet101"), path, choice="cirkd_deeplabv3_resnet101")
    message = str(err.value)
    assert "\n" not in message and "shape(s) differ" in message
    assert (
        "the file is CIRKD's cirkd_deeplabv3_resnet18 (11 classes): use teacher=cirkd_deeplabv3_resnet18"
        in message
    )


def test_an_smp_network_refuses_a_cirkd_file(cirkd_files):
    _, path = cirkd_files["deeplabv3_resnet18"]
    with pytest.raises(
        ConfigError,
        match=r"does not fit teacher=resnet18 .*not a cirkd_\* network.*use teacher=cirkd_deeplabv3_resnet18",
    ):
        load_teacher(network_config("resnet18"), path, choice="resnet18")


def test_cirkd_names_are_only_for_cirkd_networks():
    assert weight_formats.cirkd_names(network_config("resnet18")) is None
    assert weight_formats.cirkd_names(network_config("pspnet_resnet18")) is None


# ------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("kind", ["deeplabv3_resnet18", "deeplabv3_mobilenetv2", "pspnet_resnet18"])
def test_export_to_cirkd_layout_loads_into_the_independent_network(kind):
    """The other direction: this package's weights written under CIRKD's names load strictly into a network of
    CIRKD's layout (what CIRKD's eval.py does with --pretrained) and give the same logits."""
    net = network_config(f"cirkd_{kind}").eval()
    with torch.no_grad():  # non-trivial BN statistics, so a swapped BN tensor would show
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    ref = ReferenceNet(kind, CLASSES).eval()
    ref.load_state_dict(weight_formats.to_cirkd_state_dict(net), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, _ = ref(x)
        torch.testing.assert_close(net(x).logits, logits, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------- entry points
def reference_miou(ref: torch.nn.Module, datamodule) -> float:
    """mIoU (%) of ``ref`` on the validation images: whole-image logits upsampled (bilinear, align_corners) to
    the label size, a confusion matrix, IoU of each class present in labels or predictions."""
    confusion = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    for item in datamodule.val_dataloader().dataset:
        image, mask = item["image"][None], torch.as_tensor(item["mask"]).long()
        with torch.no_grad():
            logits = F.interpolate(ref(image)[0], size=mask.shape, mode="bilinear", align_corners=True)
        pred, valid = logits.argmax(1)[0], mask != 255
        np.add.at(confusion, (mask[valid].numpy(), pred[valid].numpy()), 1)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0]) * 100)


def test_evaluate_a_cirkd_checkpoint_without_naming_its_network(tmp_path, cirkd_files):
    """``python -m rdd_lightning.evaluate ckpt_path=<a CIRKD file>``: the network is read from the file's keys,
    the inputs are CIRKD's (caffe), and the mIoU is the independent network's."""
    from rdd_lightning.builders import build_datamodule
    from rdd_lightning.evaluate import run

    ref, path = cirkd_files["deeplabv3_resnet18"]
    tiny = [o for o in TINY if o.startswith(("dataset.", "trainer."))]
    cfg = compose_train_cfg(tmp_path, [*tiny, f"ckpt_path={path}", "dataset.normalization=caffe"], "evaluate")
    results = run(cfg)
    assert results["network"] == {
        "arch": "DeepLabV3",
        "encoder_name": "tu-resnet18",
        "num_classes": 11,
        "aux_head": True,
    }
    assert results["mIoU"] == pytest.approx(
        reference_miou(ref, build_datamodule(cfg, stage="validate")), abs=1e-6
    )

    wrong = compose_train_cfg(tmp_path, [*tiny, f"ckpt_path={path}"], "evaluate", run_dir=tmp_path / "wrong")
    with pytest.raises(
        ConfigError, match=r"trained on inputs normalised as caffe.*set dataset.normalization=caffe"
    ):
        run(wrong)
    GlobalHydra.instance().clear()


def test_predict_opens_a_cirkd_file_with_cirkds_inputs(tmp_path, cirkd_files):
    """``predict ckpt_path=<a CIRKD file> dataset=...``: the network from the file's keys, and the dataset's
    normalisation must be CIRKD's (the card then says caffe)."""
    from omegaconf import OmegaConf

    from rdd_lightning.deploy import open_checkpoint

    ref, path = cirkd_files["pspnet_resnet18"]

    def dataset(*overrides: str):
        return OmegaConf.create(
            OmegaConf.to_container(compose_train_cfg(tmp_path, list(overrides)).dataset, resolve=True)
        )

    synthetic = dataset("dataset.normalization=caffe")
    opened = open_checkpoint(path, None, synthetic)
    assert opened.card.normalization.bgr and opened.card.num_classes == CLASSES
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(opened.net(x).logits, ref(x)[0], atol=1e-4, rtol=0)
    imagenet = dataset()
    with pytest.raises(ConfigError, match=r"normalised as caffe.*set dataset.normalization=caffe"):
        open_checkpoint(path, None, imagenet)
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_a_cirkd_teacher_file_distils_a_cirkd_student(tmp_path, cirkd_files):
    """Training with CIRKD's teacher file (the paper's setting): it loads strictly, its validation mIoU is the
    independent network's, and the TFE/TSE stages run with its aux head."""
    from rdd_lightning.builders import build_datamodule
    from rdd_lightning.train import run

    ref, path = cirkd_files["deeplabv3_resnet18"]
    cfg = compose_train_cfg(
        tmp_path,
        [
            *TINY,
            "student=cirkd_deeplabv3_mobilenetv2",
            "student.encoder_weights=null",
            "teacher=cirkd_deeplabv3_resnet18",
            f"teacher.checkpoint={path}",
            "dataset.normalization=caffe",
            "distillation=rdd",
            "distillation.switch.step=1",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ],
    )
    results = run(cfg)
    assert results["teacher_val_miou"] == pytest.approx(reference_miou(ref, build_datamodule(cfg)), abs=1e-6)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["teacher_checkpoint"] == str(path.resolve()) and saved["global_step"] == 2

    # the student back to CIRKD's layout: a plain state dict CIRKD's networks load strictly, same logits
    from rdd_lightning.export import run as export
    from rdd_lightning.teacher import read_checkpoint, rebuild_network

    exported = export(
        compose_train_cfg(
            tmp_path,
            [f"ckpt_path={results['last_checkpoint']}", "format=cirkd"],
            "export",
            run_dir=tmp_path / "export",
        )
    )
    assert exported["file"].endswith("/export/last.cirkd.pth") and exported["format"] == "cirkd"
    state = torch.load(exported["file"], weights_only=True)
    assert all(k.startswith(("pretrained.net.features.", "head.")) for k in state)
    ref = ReferenceNet("deeplabv3_mobilenetv2", CLASSES).eval()
    ref.load_state_dict(state, strict=True)
    checkpoint = read_checkpoint(results["last_checkpoint"])
    student = rebuild_network(results["last_checkpoint"], checkpoint, None, CLASSES)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x)[0], student(x).logits, atol=1e-4, rtol=0)
    GlobalHydra.instance().clear()


def test_only_cirkd_networks_export_to_cirkds_layout(tmp_path):
    from rdd_lightning.export import run as export

    net = network_config("resnet18")
    ckpt = tmp_path / "smp.ckpt"
    torch.save(
        {
            "state_dict": {f"student.{k}": v for k, v in net.state_dict().items()},
            "rdd_lightning": {
                "network": {
                    "arch": "DeepLabV3",
                    "encoder_name": "resnet18",
                    "encoder_weights": None,
                    "aux_head": True,
                    "encoder_output_stride": 8,
                    "decoder_channels": 128,
                    "upsampling": 1,
                },
                "student": net.describe(),
                "dataset": "synthetic",
            },
        },
        ckpt,
    )
    cfg = compose_train_cfg(tmp_path, [f"ckpt_path={ckpt}", "format=cirkd", "dataset=synthetic"], "export")
    with pytest.raises(
        ConfigError, match=r"format=cirkd: the network .*DeepLabV3 over 'resnet18'.* not one of CIRKD's"
    ):
        export(cfg)
    assert not (tmp_path / "export").exists()
    GlobalHydra.instance().clear()

"""Using a trained student: `python -m rdd_lightning.predict` (a folder with sub-folders and two image sizes
in one batch, a glob, a dataset split, sliding windows, the outputs' values, never overwriting, bad input) and
`python -m rdd_lightning.export` (ONNX via onnxruntime and TorchScript against PyTorch eager within 1e-4 on
random images of two sizes, each `returns=` form, the normalisation baked in (BGR here), the auxiliary head,
the state_dict file, the model card, `predict` on the exported files, refusals)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from rdd_lightning import export, predict
from rdd_lightning.data.synthetic import CLASS_NAMES
from rdd_lightning.data.transforms import CAFFE_MEAN_BGR
from rdd_lightning.deploy import CARD_KEY, ModelCard, provenance
from rdd_lightning.errors import ConfigError
from rdd_lightning.inference import InferenceConfig, predict_logits
from rdd_lightning.models import build_model
from tests.conftest import TINY, compose_train_cfg, train_once
from tests.fake_networks import (
    assert_same_classes,
    blocky_image,
    network_of,
    normalise,
    reference_logits,
    save_checkpoint,
    varied_network,
    write_images,
)

# a supervised student (no teacher to train), on BGR mean-subtracted input so the channel order is exercised
TRAIN = [
    "distillation=none",
    "student.decoder_channels=32",
    "dataset.normalization=caffe",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "task_name=student",
]
DATASET_TINY = [o for o in TINY if o.startswith("dataset.")]
IMAGES = {"street/a.png": (56, 72), "street/b.png": (40, 48), "park/c.png": (56, 72), "d.png": (61, 77)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    return train_once(tmp_path_factory, "student", TRAIN)


@pytest.fixture(scope="module")
def varied(trained) -> Path:
    """The trained run's network with weights whose classes vary per pixel (see tests/fake_networks.py), as
    another checkpoint of that run (so its classes and normalisation come from the run's record)."""
    base = torch.load(trained["best_checkpoint"], map_location="cpu", weights_only=True)
    record = base["rdd_lightning"]["network"]
    net = varied_network(11, "caffe", network={**record, "zero_init_residual": False})
    path = Path(trained["output_dir"]) / "checkpoints" / "varied.ckpt"
    return save_checkpoint(net, path, dataset="synthetic", network=record, base=base)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("images")
    return folder, write_images(folder, IMAGES)


@pytest.fixture
def predict_cfg(tmp_path):
    """``predict_cfg(*overrides)`` -> a composed predict config, its own output folder each call."""
    calls = []

    def make(*overrides: str):
        calls.append(None)
        run_dir = tmp_path / f"run{len(calls) - 1}"
        return compose_train_cfg(
            tmp_path, ["progress_bar=false", "num_workers=0", *overrides], "predict", run_dir
        )

    yield make
    GlobalHydra.instance().clear()


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# ------------------------------------------------------------------------------------------------ outputs
@pytest.mark.slow
def test_trained_student_segments_a_folder_into_palette_masks_and_overlays(trained, images, predict_cfg):
    folder, pixels = images
    cfg = predict_cfg(
        f"ckpt_path={trained['best_checkpoint']}",
        f"input={folder}",
        "save.labels=true",
        "overlay_format=png",
        "overlay_alpha=0.25",
    )
    summary = predict.run(cfg)
    out = Path(cfg.output)
    assert out == Path(cfg.paths.output_dir) and summary["num_images"] == 4
    assert summary["written"] == ["labels", "mask", "overlay"] and summary["images_per_s"] > 0
    palette = np.asarray(summary["model"]["palette"], dtype=np.uint8)
    assert palette.shape == (11, 3) and summary["model"]["classes"][:3] == ["sky", "ground", "wall"]
    net = network_of(trained["best_checkpoint"], 11)
    for name, image in pixels.items():
        stem = name[: -len(".png")]  # sub-folders are kept: street/a, park/c, d
        labels = read(out / "labels" / f"{stem}.png")
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
        assert_same_classes(labels, reference_logits(net, normalise(image, "caffe")))
        mask = read(out / "masks" / f"{stem}.png")
        assert np.array_equal(mask, palette[labels])
        blended = read(out / "overlays" / f"{stem}.png").astype(int)
        assert np.abs(blended - (0.75 * image + 0.25 * mask)).max() <= 0.5 + 1e-6
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(written) == 12 and "masks/street/a.png" in written and "overlays/d.png" in written


@pytest.mark.slow
@pytest.mark.parametrize(
    ("inputs", "inference"),
    [("", []), ("street/a*.png", ["inference.mode=slide", "inference.window=[48,64]"])],
    ids=["folder-whole", "glob-slide"],
)
def test_every_image_as_the_inference_code_predicts_it_alone(varied, images, predict_cfg, inputs, inference):
    # batches of 3: a and c (56x72) share one, b and d each have their own; each must match its own forward
    folder, pixels = images
    cfg = predict_cfg(
        f"ckpt_path={varied}",
        f"input={folder / inputs}",
        "save.labels=true",
        "save.overlay=false",
        "batch_size=3",
        *inference,
    )
    summary = predict.run(cfg)
    settings = InferenceConfig.from_any(summary["inference"])
    assert settings.mode == ("slide" if inference else "whole")
    net = network_of(varied, 11)
    chosen = {k: v for k, v in pixels.items() if k.startswith("street/a")} if inputs else pixels
    assert summary["num_images"] == len(chosen)
    for name, image in chosen.items():
        labels = read(Path(cfg.output) / "labels" / (Path(name).name if inputs else name))
        x = normalise(image, "caffe")
        expected = predict_logits(net, x, settings) if inference else reference_logits(net, x)
        assert_same_classes(labels, expected)
        assert len(np.unique(labels)) >= 2  # the check can fail: classes vary over the image


@pytest.mark.slow
def test_dataset_split_as_input(trained, predict_cfg):
    cfg = predict_cfg(
        f"ckpt_path={trained['last_checkpoint']}",
        "dataset=synthetic",
        *DATASET_TINY,
        "split=test",
        "save.overlay=false",
    )
    summary = predict.run(cfg)
    assert summary["input"] == "dataset=synthetic split=test" and summary["num_images"] == 2
    masks = sorted(p.name for p in (Path(cfg.output) / "masks").iterdir())
    assert masks == ["synth_test_00000.png", "synth_test_00001.png"]
    assert read(Path(cfg.output) / "masks" / masks[0]).shape == (32, 32, 3)


@pytest.mark.slow
def test_existing_files_are_never_replaced_unless_asked(trained, images, predict_cfg, tmp_path):
    folder, _ = images
    single = folder / "d.png"
    output = tmp_path / "out"
    predict.run(predict_cfg(f"ckpt_path={trained['best_checkpoint']}", f"input={single}", f"output={output}"))
    mask = output / "masks" / "d.png"
    before = mask.stat().st_mtime_ns
    mask.write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"already holds 3 of the files to write.*overwrite=true"):
        predict.run(
            predict_cfg(f"ckpt_path={trained['best_checkpoint']}", f"input={single}", f"output={output}")
        )
    assert mask.read_bytes() == b"mine"
    predict.run(
        predict_cfg(
            f"ckpt_path={trained['best_checkpoint']}", f"input={single}", f"output={output}", "overwrite=true"
        )
    )
    assert read(mask).shape == (61, 77, 3) and mask.stat().st_mtime_ns != before


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], r"ckpt_path is required"),
        (["ckpt_path=nope.ckpt", "input=x.png"], r"ckpt_path='nope.ckpt': file not found"),
        (["ckpt_path=x", "input=a", "split=test"], r"input='a' and split='test': give one of them"),
        (["ckpt_path=x"], r"nothing to predict: pass input="),
        (["ckpt_path=x", "split=test"], r"split=test needs dataset=<name>"),
        (["ckpt_path=x", "input=does/not/exist"], r"input='does/not/exist': no such file or folder"),
        (["ckpt_path=x", "input=x", "save.mask=false", "save.overlay=false"], r"nothing to write"),
        (["ckpt_path=x", "input=x", "overlay_format=gif"], r"overlay_format='gif': choose one of"),
        (["ckpt_path=x", "input=x", "precision=16"], r"precision=16: choose one of"),
        (["ckpt_path=x", "input=x", "inference.mode=slide"], r"inference.mode=slide needs inference.window"),
    ],
)
def test_bad_settings_fail_before_any_work(predict_cfg, tmp_path, overrides, message):
    (tmp_path / "x").write_bytes(b"")  # ckpt_path=x exists (relative to the working directory)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        with pytest.raises(ConfigError, match=message):
            predict.run(predict_cfg(*overrides))


@pytest.mark.slow
def test_dataset_with_other_classes_and_unknown_submission(trained, images, predict_cfg):
    folder, _ = images
    with pytest.raises(ConfigError, match=r"predicts 11 classes .* dataset=cityscapes has 19"):
        predict.run(
            predict_cfg(f"ckpt_path={trained['best_checkpoint']}", f"input={folder}", "dataset=cityscapes")
        )
    name = r"submission=cityscapes: image 'd' is not named <city>_<seq>_<frame>_leftImg8bit"
    with pytest.raises(ConfigError, match=name):
        predict.run(
            predict_cfg(f"ckpt_path={trained['best_checkpoint']}", f"input={folder}", "submission=cityscapes")
        )
    classes = r"submission=ade20k needs a network of the 150 ade20k classes; .* predicts 11"
    with pytest.raises(ConfigError, match=classes):
        predict.run(
            predict_cfg(f"ckpt_path={trained['best_checkpoint']}", f"input={folder}", "submission=ade20k")
        )
    with pytest.raises(ConfigError, match=r"submission='kitti': choose one of"):
        predict.run(
            predict_cfg(f"ckpt_path={trained['best_checkpoint']}", f"input={folder}", "submission=kitti")
        )


def test_weight_file_without_a_record_takes_dataset_and_student(predict_cfg, tmp_path):
    # a bare state dict (as other code bases save them): classes from dataset=, network from student=
    net = varied_network(11)
    path = tmp_path / "bare.pth"
    torch.save(net.state_dict(), path)
    pixels = write_images(tmp_path, {"a.png": (24, 40)})["a.png"]
    image = f"input={tmp_path / 'a.png'}"
    with pytest.raises(ConfigError, match=r"records neither its dataset nor a run directory; pass dataset="):
        predict.run(predict_cfg(f"ckpt_path={path}", image))
    cfg = predict_cfg(
        f"ckpt_path={path}",
        image,
        "dataset=synthetic",
        "student=resnet18_scratch",
        "student.decoder_channels=32",
        "save.labels=true",
    )
    summary = predict.run(cfg)
    assert (
        summary["model"]["dataset"] == "synthetic"
        and summary["model"]["normalization"]["channel_order"] == "RGB"
    )
    assert_same_classes(
        read(Path(cfg.output) / "labels" / "a.png"), reference_logits(net, normalise(pixels, "imagenet"))
    )


# ================================================================================================== export
EXPORTS = {  # name -> export overrides
    "onnx_pixels_aux": ["format=onnx", "returns=logits_input", "normalize=true", "aux_head=true"],
    "ts_classes": ["format=torchscript"],  # returns=class_map, normalised float input
    "ts_net": ["format=torchscript", "returns=logits_net"],
    "state_dict": ["format=state_dict"],  # of the run's best.ckpt (the others: of the varied checkpoint)
}
CHECK = "check_sizes=[[27,35]]"  # the export's own check (one small size instead of the default two)
SIZES = [(2, 61, 77), (1, 45, 52)]  # (batch, h, w): neither a multiple of the stride 8
NET_SIZES = [(2, 64, 80), (1, 48, 56)]


def compose(tmp: Path, config_name: str, overrides: list[str], name: str):
    return compose_train_cfg(tmp, overrides, config_name, run_dir=tmp / name)


@pytest.fixture(scope="module")
def exported(trained, varied, tmp_path_factory) -> dict[str, dict]:
    """Every export, into one folder (the state_dict into the run's export/ folder): name -> the card
    ``export.run`` returned."""
    tmp = tmp_path_factory.mktemp("exports")
    out = {}
    with pytest.MonkeyPatch.context() as mp:  # as conftest's autouse fixture (not yet active for this one)
        mp.setenv("RDD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        for name, overrides in EXPORTS.items():
            if name == "state_dict":
                where = [f"ckpt_path={trained['best_checkpoint']}"]
            else:
                where = [f"ckpt_path={varied}", f"output={tmp / name}"]
            out[name] = export.run(compose(tmp, "export", [*where, CHECK, *overrides], name))
    GlobalHydra.instance().clear()
    return out


def random_pixels(batch: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([blocky_image(rng, h, w, block=4) for _ in range(batch)])


def expected_logits(net, pixels: np.ndarray, head: str = "logits") -> torch.Tensor:
    """Whole-image logits of a batch of uint8 images, by the tests' own reference (caffe normalisation)."""
    return torch.cat([reference_logits(net, normalise(p, "caffe"), head=head) for p in pixels])


def caffe_input(pixels: np.ndarray) -> np.ndarray:
    """The float input a non-baked export takes: BGR minus the mean pixel, NCHW."""
    x = pixels[..., ::-1].astype(np.float32) - np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_torchscript(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        extra = {CARD_KEY: ""}
        return torch.jit.load(path, _extra_files=extra), json.loads(extra[CARD_KEY])


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.slow
def test_onnx_with_baked_normalisation_and_aux_head_matches_pytorch(exported, varied):
    session = ort.InferenceSession(exported["onnx_pixels_aux"]["file"], providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_inputs()[
        0
    ].type == "tensor(uint8)"
    assert [o.name for o in session.get_outputs()] == ["logits", "aux_logits"]
    net = network_of(varied, 11)
    for index, (batch, h, w) in enumerate(SIZES):
        pixels = random_pixels(batch, h, w, index)
        logits, aux = session.run(None, {"images": np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))})
        assert logits.shape == (batch, 11, h, w) and aux.shape == logits.shape
        assert np.abs(logits - expected_logits(net, pixels).numpy()).max() <= 1e-4
        assert np.abs(aux - expected_logits(net, pixels, "aux_logits").numpy()).max() <= 1e-4


@pytest.mark.slow
def test_torchscript_class_map_and_network_resolution_logits_match_pytorch(exported, varied):
    classes, _ = load_torchscript(exported["ts_classes"]["file"])
    net_logits, _ = load_torchscript(exported["ts_net"]["file"])
    net = network_of(varied, 11)
    for index, (batch, h, w) in enumerate(SIZES):
        pixels = random_pixels(batch, h, w, index)
        expected = expected_logits(net, pixels)
        with torch.no_grad():
            got = classes(torch.from_numpy(caffe_input(pixels)))
        assert got.dtype == torch.int64 and got.shape == (batch, h, w)
        for b in range(batch):
            assert_same_classes(got[b].numpy(), expected[b : b + 1])
    for index, (batch, h, w) in enumerate(NET_SIZES):
        x = torch.from_numpy(caffe_input(random_pixels(batch, h, w, index)))
        with torch.no_grad():
            got, expected = net_logits(x), net(x).logits
        assert got.shape == (batch, 11, h // 8, w // 8)
        assert (got - expected).abs().max() <= 1e-4


@pytest.mark.slow
def test_state_dict_file_is_the_network_alone(exported, trained):
    saved = torch.load(exported["state_dict"]["file"], map_location="cpu", weights_only=True)
    state = saved["state_dict"]
    assert not any(k.startswith(("aux_head.", "student.", "teacher.")) for k in state)
    card = json.loads(Path(exported["state_dict"]["card_file"]).read_text())
    assert card["network"]["aux_head"] is False
    net = build_model(**{**card["network"], "num_classes": card["num_classes"]})  # plain PyTorch, strict
    net.load_state_dict(state)
    net.eval()
    x = torch.from_numpy(caffe_input(random_pixels(1, 64, 72, 0)))
    with torch.no_grad():
        assert torch.equal(net(x).logits, network_of(trained["best_checkpoint"], 11)(x).logits)


# ------------------------------------------------------------------------------------------------ predict
@pytest.mark.slow
def test_predict_gives_the_checkpoints_masks_with_every_export(exported, varied, images, tmp_path):
    folder, pixels = images
    net = network_of(varied, 11)
    references = {name: reference_logits(net, normalise(image, "caffe")) for name, image in pixels.items()}
    for name in ("onnx_pixels_aux", "ts_classes", "ts_net"):  # the state_dict opens as a checkpoint does
        cfg = compose(
            tmp_path,
            "predict",
            [
                f"ckpt_path={exported[name]['file']}",
                f"input={folder}/street/*.png",
                "save.labels=true",
                "save.overlay=false",
                "progress_bar=false",
                "num_workers=0",
                "batch_size=2",
            ],
            name,
        )
        summary = predict.run(cfg)
        assert summary["format"] == EXPORTS[name][0].split("=")[1]
        assert summary["num_images"] == 2  # street/a.png (56x72), street/b.png (40x48)
        for image_name in ("street/a.png", "street/b.png"):
            reference = references[image_name]
            with Image.open(Path(cfg.output) / "labels" / Path(image_name).name) as labels:
                assert_same_classes(np.asarray(labels), reference)
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_predict_refuses_what_an_export_cannot_do(exported, images, tmp_path):
    folder, _ = images
    base = ["progress_bar=false", "num_workers=0", f"input={folder}"]
    cases = [
        (
            ["ts_classes", "inference.scales=[0.5,1.0]"],
            r"returns class maps, so it predicts whole images only",
        ),
        (
            ["onnx_pixels_aux", "precision=16-mixed"],
            r"mixed precision applies to checkpoints, not to onnx files",
        ),
        (["onnx_pixels_aux", "student=resnet18"], r"is an exported onnx file: leave student= out"),
    ]
    for index, ((name, *extra), message) in enumerate(cases):
        cfg = compose(
            tmp_path, "predict", [f"ckpt_path={exported[name]['file']}", *base, *extra], f"p{index}"
        )
        with pytest.raises(ConfigError, match=message):
            predict.run(cfg)
    GlobalHydra.instance().clear()


# ------------------------------------------------------------------------------------------------ card
@pytest.mark.slow
def test_model_card_beside_and_inside_the_files(exported, trained):
    card = json.loads(Path(exported["onnx_pixels_aux"]["card_file"]).read_text())
    assert card["classes"] == list(CLASS_NAMES) and len(card["palette"]) == 11 and card["output_stride"] == 8
    assert card["normalization"]["channel_order"] == "BGR" and card["normalization"]["baked_in"] is True
    assert card["normalization"]["mean"] == pytest.approx([m / 255 for m in CAFFE_MEAN_BGR])
    assert card["normalization"]["std"] == pytest.approx([1 / 255] * 3)
    assert card["input"]["dtype"] == "uint8" and card["output"]["returns"] == "logits_input"
    assert card["validation"]["image_sizes"] == [{"size": [32, 32], "images": 4}]  # the tiny run's val split
    assert card["distillation"] == "none" and card["teacher"] is None
    assert card["source"]["run_dir"] == trained["output_dir"] and card["source"]["global_step"] == 2
    check = card["export"]["check"]
    assert check["max_abs_diff"] <= 1e-4 and check["sizes"] == [[27, 35]]
    # the copy inside the file is the same card, but for the check that ran on the written file
    session = ort.InferenceSession(exported["onnx_pixels_aux"]["file"], providers=["CPUExecutionProvider"])
    inside = json.loads(session.get_modelmeta().custom_metadata_map[CARD_KEY])
    assert inside == {**card, "export": {k: v for k, v in card["export"].items() if k != "check"}}
    _, ts_card = load_torchscript(exported["ts_classes"]["file"])
    assert ts_card["output"]["returns"] == "class_map" and ts_card["input"]["dtype"] == "float32"
    assert ModelCard.from_dict(ts_card, "ts").normalization.bgr is True
    # the best checkpoint's export: into its run's folder, with the validation mIoU of these weights
    best = exported["state_dict"]
    assert Path(best["file"]) == Path(trained["output_dir"]) / "export" / "best.state_dict.pt"
    assert best["validation"]["weights"] == "best" and best["validation"]["miou"] == trained["best_val_miou"]
    assert card["validation"]["weights"] is None  # varied.ckpt is neither the run's best nor its last


def test_provenance_reads_the_run_record(tmp_path):
    # a distilled run as train.py records it (results.json) and as its checkpoint records its teacher
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    results = {
        "best_val_miou": 40.0,
        "final_val_miou": 38.5,
        "best_checkpoint": str(run_dir / "checkpoints/best.ckpt"),
        "last_checkpoint": str(ckpt),
        "distillation": "rdd",
        "teacher_val_miou": 51.0,
        "seed": 3,
        "experiment": "demo",
        "overrides": ["seed=3"],
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    checkpoint = {
        "global_step": 200,
        "rdd_lightning": {"teacher": {"checkpoint": "/t.ckpt", "sha256": "ab12"}},
        "hyper_parameters": {"inference": {"mode": "whole"}},
    }
    record = provenance(ckpt, checkpoint, run_dir)
    assert record["validation"]["miou"] == 38.5 and record["validation"]["weights"] == "last"
    assert record["teacher"] == {"checkpoint": "/t.ckpt", "sha256": "ab12", "val_miou": 51.0}
    assert (
        record["distillation"] == "rdd"
        and record["source"]["seed"] == 3
        and record["source"]["global_step"] == 200
    )


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.slow
def test_export_refuses_existing_files_and_bad_settings(exported, varied, tmp_path):
    taken = Path(exported["ts_classes"]["file"])
    before = taken.stat().st_mtime_ns
    cases = [
        (
            [f"ckpt_path={varied}", "format=torchscript", f"output={taken.parent}"],
            r"exists; .* overwrite=true",
        ),
        (
            [f"ckpt_path={varied}", "format=state_dict", "normalize=true"],
            r"format=state_dict writes the network",
        ),
        ([f"ckpt_path={varied}", "returns=logits"], r"returns='logits': choose one of"),
        ([f"ckpt_path={varied}", "format=tflite"], r"format='tflite': choose one of"),
        ([f"ckpt_path={taken}"], r"is an exported file already; pass a checkpoint"),
        ([f"ckpt_path={varied}", "check_sizes=[[64]]"], r"check_sizes=.*give one or more \[height, width\]"),
        (
            [f"ckpt_path={varied}", f"output={tmp_path / 'x.onnx'}", "format=torchscript"],
            r"ends with .torchscript.pt",
        ),
    ]
    for index, (overrides, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            export.run(compose(tmp_path, "export", overrides, f"e{index}"))
    GlobalHydra.instance().clear()
    assert taken.stat().st_mtime_ns == before  # the refused export left the existing file alone

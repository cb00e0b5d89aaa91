"""Benchmark-server files (`predict ... submission=cityscapes|ade20k|voc`) on tiny fake test splits, against
hand-made expectations: names, folders, sizes, value ranges, the Cityscapes trainId -> labelId mapping (and the
file lookup of cityscapesscripts' evaluation), the archives; and the test splits' image listing."""

from __future__ import annotations

import tarfile
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from rdd_lightning.data import ADE20K, VOC, Cityscapes
from rdd_lightning.errors import ConfigError
from rdd_lightning.predict import run
from rdd_lightning.submission import TRAIN_ID_TO_LABEL_ID, submission_format
from tests.conftest import compose_train_cfg
from tests.fake_networks import TINY_NETWORK, save_checkpoint, varied_network, write_images

# Cityscapes' label ids of the 19 train ids, written out from the dataset's label table
LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CITYSCAPES_TEST = {
    "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png": (40, 64),
    "leftImg8bit/test/berlin/berlin_000001_000019_leftImg8bit.png": (40, 64),
    "leftImg8bit/test/bonn/bonn_000000_000019_leftImg8bit.png": (48, 56),
}


def read(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def test_train_ids_map_to_cityscapesscripts_label_ids():
    from cityscapesscripts.helpers.labels import trainId2label

    assert TRAIN_ID_TO_LABEL_ID.tolist() == LABEL_IDS
    assert [trainId2label[t].id for t in range(19)] == LABEL_IDS


def test_cityscapes_test_split_becomes_the_servers_label_id_pngs(tmp_path):
    root = tmp_path / "cityscapes"
    write_images(root, CITYSCAPES_TEST)  # images only: the test split's labels are not needed
    net = varied_network(19)
    ckpt = save_checkpoint(
        net, tmp_path / "weights" / "student.ckpt", dataset="cityscapes", network=TINY_NETWORK
    )
    cfg = compose_train_cfg(
        tmp_path,
        [
            f"ckpt_path={ckpt}",
            "dataset=cityscapes",
            f"dataset.root={root}",
            "split=test",
            "submission=cityscapes",
            "save.labels=true",
            "save.overlay=false",
            "progress_bar=false",
            "num_workers=0",
        ],
        "predict",
        tmp_path / "out",
    )
    summary = run(cfg)
    GlobalHydra.instance().clear()
    out = Path(cfg.output)
    folder = out / "submission" / "cityscapes"
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert written == [
        "berlin/berlin_000000_000019_leftImg8bit.png",
        "berlin/berlin_000001_000019_leftImg8bit.png",
        "bonn/bonn_000000_000019_leftImg8bit.png",
    ]
    palette = np.asarray(cfg.dataset.palette, dtype=np.uint8)
    seen = set()
    for name, (h, w) in CITYSCAPES_TEST.items():
        stem = "/".join(name.split("/")[2:])[: -len(".png")]  # <city>/<frame name>
        submitted = read(folder / f"{stem}.png")
        assert submitted.mode == "L" and submitted.size == (w, h)
        train_ids = np.asarray(read(out / "labels" / f"{stem}.png"))
        assert np.array_equal(np.asarray(submitted), np.asarray(LABEL_IDS)[train_ids])
        assert np.array_equal(np.asarray(read(out / "masks" / f"{stem}.png")), palette[train_ids])
        seen |= set(np.unique(np.asarray(submitted)).tolist())
    assert len(seen) >= 3 and seen <= set(LABEL_IDS)
    with zipfile.ZipFile(summary["submission"]["archive"]) as archive:
        assert sorted(n for n in archive.namelist() if n.endswith(".png")) == written
    # the official evaluation finds every prediction by its ground truth's name
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

    args = Namespace(predictionPath=str(folder), predictionWalk=None)
    for name in CITYSCAPES_TEST:
        gt = root / name.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit", "_gtFine_labelIds")
        assert Path(cs_eval.getPrediction(args, str(gt))).name == Path(name).name


def test_cityscapes_names_must_be_the_datasets():
    with pytest.raises(ConfigError, match=r"'photos/holiday' is not named <city>_<seq>_<frame>_leftImg8bit"):
        submission_format("cityscapes").relative_path("photos/holiday")


def test_ade20k_pngs_hold_train_id_plus_one(tmp_path):
    ade = submission_format("ade20k")
    classes = np.array([[0, 149, 7], [12, 12, 0]])
    image = ade.encode(classes)
    assert image.mode == "L" and np.asarray(image).tolist() == [[1, 150, 8], [13, 13, 1]]
    assert ade.relative_path("testing/ADE_test_00000001") == "ADE_test_00000001.png"
    assert ade.archive_name() == "ade20k.zip"
    with pytest.raises(ConfigError, match=r"needs a network of the 150 ade20k classes; x predicts 19"):
        ade.check_classes(19, "x")


def test_voc_pngs_are_palette_images_in_the_servers_folder(tmp_path):
    voc = submission_format("voc")
    image = voc.encode(np.array([[0, 15, 20], [1, 1, 0]]))
    assert image.mode == "P" and np.asarray(image).tolist() == [[0, 15, 20], [1, 1, 0]]
    colours = np.asarray(image.getpalette()[: 256 * 3]).reshape(-1, 3)
    # VOC's colour map: background black, aeroplane (1) dark red, person (15) (192, 128, 128), void (224, 224, 192)
    assert colours[[0, 1, 15, 20, 255]].tolist() == [
        [0, 0, 0],
        [128, 0, 0],
        [192, 128, 128],
        [0, 64, 128],
        [224, 224, 192],
    ]
    path = voc.relative_path("JPEGImages/2008_000001")
    assert path == "results/VOC2012/Segmentation/comp6_test_cls/2008_000001.png"
    folder = tmp_path / "voc"
    (folder / path).parent.mkdir(parents=True)
    image.save(folder / path)
    archive = voc.write_archive(folder, tmp_path / voc.archive_name())
    assert archive.name == "voc.tar.gz"
    with tarfile.open(archive) as tar:
        assert [n for n in tar.getnames() if n.endswith(".png")] == [f"./{path}"]


# ------------------------------------------------------------------------------------------------ test splits
def test_test_splits_list_their_images_without_labels(tmp_path):
    write_images(tmp_path / "cs", {"leftImg8bit/test/bonn/bonn_000000_000019_leftImg8bit.png": (8, 8)})
    assert [p.name for p, _ in Cityscapes(tmp_path / "cs", "test", labels=False).pairs] == [
        "bonn_000000_000019_leftImg8bit.png"
    ]
    write_images(
        tmp_path / "ade",
        {
            "release_test/testing/ADE_test_00000002.jpg": (8, 8),
            "release_test/testing/ADE_test_00000001.jpg": (8, 8),
        },
    )
    (tmp_path / "ade" / "images").mkdir()
    assert [p.name for p, _ in ADE20K(tmp_path / "ade", "test", labels=False).pairs] == [
        "ADE_test_00000001.jpg",
        "ADE_test_00000002.jpg",
    ]
    with pytest.raises(ConfigError, match=r"unknown split 'test'; choose one of \['train', 'val'\]"):
        ADE20K(tmp_path / "ade", "test")  # with labels: ADE20K has none for its test images
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    write_images(voc, {"JPEGImages/2008_000001.jpg": (8, 8), "JPEGImages/2008_000002.jpg": (8, 8)})
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "test.txt").write_text("2008_000002\n2008_000001\n")
    assert [p.name for p, _ in VOC(tmp_path, "test", labels=False).pairs] == [
        "2008_000001.jpg",
        "2008_000002.jpg",
    ]
    (voc / "ImageSets" / "Segmentation" / "test.txt").write_text("2008_000003\n")
    with pytest.raises(ConfigError, match=r"names 1 image file\(s\) that do not exist"):
        VOC(tmp_path, "test", labels=False)

"""The real-dataset loaders on tiny datasets written in each dataset's real layout and label encoding.

The ``write_*`` helpers below are shared with the other ``test_data_*`` modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rdd_lightning.data import ADE20K, VOC, CamVid, Cityscapes, SegmentationDataModule
from rdd_lightning.data.cityscapes import LABEL_ID_TO_TRAIN_ID
from rdd_lightning.data.voc import voc_colormap
from rdd_lightning.errors import ConfigError

HW = (16, 24)  # every tiny image is 16 x 24 unless a test says otherwise
KNOWN = (3, 5)  # (row, col) of the pixel whose raw label each writer sets to a known value


# ---------------------------------------------------------------------------------------------- writers
def raw_label(seed: int, values: list[int], hw: tuple[int, int] = HW, known: int | None = None) -> np.ndarray:
    """``uint8 [h, w]``: 4x4-pixel blocks of raw values drawn from ``values``; ``known`` at :data:`KNOWN`."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(values, size=(-(-hw[0] // 4), -(-hw[1] // 4)))
    label = np.kron(blocks, np.ones((4, 4), dtype=np.int64))[: hw[0], : hw[1]].astype(np.uint8)
    if known is not None:
        label[KNOWN] = known
    return label


def rgb_image(seed: int, hw: tuple[int, int] = HW) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, palette: bool = False) -> Path:
    """Write ``array`` (PNG or JPEG by suffix); ``palette``: a mode-P PNG with VOC's colour map."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette:
        image = image.convert("P")  # keeps the values as palette indices
        image.putpalette([v for colour in voc_colormap() for v in colour])
    image.save(path)
    return path


def write_camvid(root: Path, counts: dict[str, int] | None = None, hw: tuple[int, int] = HW) -> Path:
    """SegNet CamVid: ``<split>/*.png`` images, ``<split>annot/*.png`` labels 0..10, 11 void."""
    for s, (split, n) in enumerate((counts or {"train": 2, "val": 1, "test": 1}).items()):
        for i in range(n):
            name = f"0001TP_{s}{i:05d}.png"
            save(root / split / name, rgb_image(10 * s + i, hw))
            save(root / f"{split}annot" / name, raw_label(10 * s + i, [0, 3, 8, 11], hw, known=11))
    return root


CITYSCAPES_IDS = [0, 4, 7, 24, 26, 33]  # unlabeled, static (void), road, person, car, bicycle


def write_cityscapes(root: Path, counts: dict[str, int] | None = None, hw: tuple[int, int] = HW) -> Path:
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and ``gtFine/<split>/<city>/*_gtFine_*`` (the
    labelIds beside the colour, instance, trainId and polygon files, as the official zip has them)."""
    cities = ("aachen", "bochum")
    for s, (split, n) in enumerate((counts or {"train": 3, "val": 1, "test": 1}).items()):
        for i in range(n):
            city = cities[i % 2]
            stem = f"{city}_{s:06d}_{i:06d}"
            save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb_image(20 * s + i, hw))
            gt = root / "gtFine" / split / city
            ids = raw_label(20 * s + i, CITYSCAPES_IDS, hw, known=26)
            save(gt / f"{stem}_gtFine_labelIds.png", ids)
            save(gt / f"{stem}_gtFine_color.png", rgb_image(0, hw))
            save(gt / f"{stem}_gtFine_instanceIds.png", ids.astype(np.uint16) * 1000)
            save(gt / f"{stem}_gtFine_labelTrainIds.png", np.full(hw, 19, np.uint8))
            (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    return root


def write_voc(
    root: Path,
    train_ids: int = 3,
    val_ids: int = 2,
    aug_mode: str = "L",
    train_list: str = "ImageSets/Segmentation/train_aug.txt",
    two_column: bool = False,
    hw: tuple[int, int] = HW,
) -> Path:
    """``VOCdevkit/VOC2012`` under ``root``: JPEG images, palette ``SegmentationClass`` (val) and
    ``SegmentationClassAug`` (train; ``aug_mode`` ``L`` = grayscale or ``P`` = palette) with 255 borders."""
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    train = [f"2008_{i:06d}" for i in range(train_ids)]
    val = [f"2009_{i:06d}" for i in range(val_ids)]
    for i, name in enumerate(train + val):
        size = (hw[0] + 2 * i, hw[1])  # VOC images differ in size
        save(voc / "JPEGImages" / f"{name}.jpg", rgb_image(30 + i, size))
        label = raw_label(30 + i, [0, 0, 15, 255, 20], size, known=15)
        save(voc / "SegmentationClass" / f"{name}.png", label, palette=True)
        save(voc / "SegmentationClassAug" / f"{name}.png", label, palette=aug_mode == "P")
    lines = [f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png" if two_column else n for n in train]
    (voc / train_list).parent.mkdir(parents=True, exist_ok=True)
    (voc / train_list).write_text("\n".join(lines) + "\n")
    (sets / "train.txt").write_text("\n".join(train[:1]) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    return root


def write_ade20k(root: Path, counts: dict[str, int] | None = None, hw: tuple[int, int] = HW) -> Path:
    """``ADEChallengeData2016`` under ``root``: ``images/<split>/*.jpg``, ``annotations/<split>/*.png``
    with values 0 (other = void) .. 150."""
    ade = root / "ADEChallengeData2016"
    for s, (folder, n) in enumerate((counts or {"training": 2, "validation": 2}).items()):
        prefix = "train" if folder == "training" else "val"
        for i in range(n):
            name = f"ADE_{prefix}_{i + 1:08d}"
            size = (hw[0], hw[1] + 4 * i)
            save(ade / "images" / folder / f"{name}.jpg", rgb_image(40 + 10 * s + i, size))
            label = raw_label(40 + 10 * s + i, [0, 1, 2, 150], size, known=150)
            save(ade / "annotations" / folder / f"{name}.png", label)
    (ade / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    return root


WRITERS = {"camvid": write_camvid, "cityscapes": write_cityscapes, "voc": write_voc, "ade20k": write_ade20k}
CLASSES = {"camvid": CamVid, "cityscapes": Cityscapes, "voc": VOC, "ade20k": ADE20K}


# ------------------------------------------------------------------------------------------ the loaders
def check_item(item: dict, hw: tuple[int, int], num_classes: int) -> np.ndarray:
    image, mask = item["image"], item["mask"]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (*hw, 3)
    assert mask.dtype == np.int64 and mask.shape == hw
    values = set(np.unique(mask).tolist())
    assert values <= set(range(num_classes)) | {255}, values
    return mask


def test_camvid_reads_segnet_layout(tmp_path):
    root = write_camvid(tmp_path / "camvid")
    ds = CamVid(root, "train")
    assert len(ds) == 2 and [len(CamVid(root, s)) for s in ("val", "test")] == [1, 1]
    mask = check_item(ds[0], HW, 11)
    raw = np.asarray(Image.open(ds.pairs[0][1]))
    assert mask[KNOWN] == 255  # 11 = void
    np.testing.assert_array_equal(mask, np.where(raw == 11, 255, raw))


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    ds = Cityscapes(root, "train")
    assert len(ds) == 3 and len(Cityscapes(root, "val")) == 1 and len(Cityscapes(root, "test")) == 1
    assert {p[0].parent.name for p in ds.pairs} == {"aachen", "bochum"}  # every city folder
    for image_path, label_path in ds.pairs:
        assert label_path.name == image_path.name.replace("_leftImg8bit", "_gtFine_labelIds")
    item = ds[0]
    mask = check_item(item, HW, 19)
    assert mask[KNOWN] == 13  # labelId 26 (car) -> train id 13
    raw = np.asarray(Image.open(ds.pairs[0][1]))
    expected = {0: 255, 4: 255, 7: 0, 24: 11, 26: 13, 33: 18}
    for raw_id, train_id in expected.items():
        assert (mask[raw == raw_id] == train_id).all(), raw_id
    assert item["name"] == "aachen_000000_000000_leftImg8bit"


def test_cityscapes_lut_matches_the_official_label_table():
    from cityscapesscripts.helpers.labels import labels

    lut = Cityscapes.label_lut(Cityscapes)
    evaluated = sorted((lb.trainId, lb.name, lb.color) for lb in labels if lb.trainId not in (255, -1))
    for lb in labels:
        raw = lb.id % 256  # license plate's -1 as a uint8 file would hold it
        assert lut[raw] == (lb.trainId if lb.trainId not in (255, -1) else 255), lb.name
    assert [t for t, _, _ in evaluated] == list(range(19))
    assert list(Cityscapes.CLASS_NAMES) == [n for _, n, _ in evaluated]
    assert [tuple(c) for c in Cityscapes.PALETTE] == [tuple(c) for _, _, c in evaluated]
    assert {lb.id: lb.trainId for lb in labels if lb.trainId not in (255, -1)} == LABEL_ID_TO_TRAIN_ID
    assert (lut[34:255] == -1).all()  # not a labelId: reported as a bad value


@pytest.mark.parametrize(
    "nest,train_list,aug_mode,two_column",
    [
        ("VOCdevkit/VOC2012", "ImageSets/Segmentation/train_aug.txt", "L", False),
        ("VOCdevkit", "ImageSets/Segmentation/trainaug.txt", "P", False),
        ("", "ImageSets/SegmentationAug/train_aug.txt", "L", True),
    ],
)
def test_voc_reads_both_label_encodings_lists_and_roots(tmp_path, nest, train_list, aug_mode, two_column):
    write_voc(tmp_path, train_list=train_list, aug_mode=aug_mode, two_column=two_column)
    root = tmp_path / nest if nest else tmp_path
    train, val = VOC(root, "train"), VOC(root, "val")
    assert len(train) == 3 and len(val) == 2
    assert all(p[1].parent.name == "SegmentationClassAug" for p in train.pairs)
    assert all(p[1].parent.name == "SegmentationClass" for p in val.pairs)
    for ds in (train, val):
        for i in range(len(ds)):
            item = ds[i]
            mask = check_item(item, item["image"].shape[:2], 21)
            assert mask[KNOWN] == 15  # person
            assert (mask == 255).any() and set(np.unique(mask).tolist()) <= {0, 15, 20, 255}
    assert Image.open(val.pairs[0][1]).mode == "P"
    assert Image.open(train.pairs[0][1]).mode == aug_mode


def test_ade20k_shifts_classes_and_voids_other(tmp_path):
    write_ade20k(tmp_path)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        train, val = ADE20K(root, "train"), ADE20K(root, "validation")
        assert len(train) == 2 and len(val) == 2 and val.split == "val"
    item = train[1]
    mask = check_item(item, (HW[0], HW[1] + 4), 150)
    assert mask[KNOWN] == 149  # raw 150 -> 149
    raw = np.asarray(Image.open(train.pairs[1][1]))
    np.testing.assert_array_equal(mask, np.where(raw == 0, 255, raw.astype(np.int64) - 1))


@pytest.mark.parametrize("name", list(WRITERS))
def test_datamodule_batches(tmp_path, name):
    WRITERS[name](tmp_path / name)
    cls = CLASSES[name]
    dm = SegmentationDataModule(
        name,
        f"rdd_lightning.data.{cls.__name__}",
        str(tmp_path / name),
        cls.NUM_CLASSES,
        crop_size=[8, 12],
        batch_size=2,
        num_workers=0,
        palette=cls.PALETTE,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 12) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 8, 12) and batch["mask"].dtype == torch.int64
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[-2:] == val["mask"].shape[-2:] and val["image"].shape[-2] >= HW[0]
    assert dm.palette == [list(c) for c in cls.PALETTE] and dm.class_names == list(cls.CLASS_NAMES)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", list(WRITERS))
def test_missing_root_names_path_layout_and_source(tmp_path, name):
    cls = CLASSES[name]
    missing = tmp_path / f"no-{name}"
    with pytest.raises(ConfigError) as err:
        cls(missing, "train")
    message = str(err.value)
    assert str(missing) in message and cls.LAYOUT in message and cls.SOURCE in message
    missing.mkdir()  # an empty folder is as bad
    with pytest.raises(ConfigError, match="missing or empty"):
        cls(missing, "train")


@pytest.mark.parametrize("name", ["voc", "ade20k"])
def test_root_without_the_dataset_says_what_it_looked_for(tmp_path, name):
    (tmp_path / "stray.txt").write_text("")
    cls = CLASSES[name]
    with pytest.raises(ConfigError, match="Expected layout") as err:
        cls(tmp_path, "train")
    assert cls.SOURCE in str(err.value)


def _first_label(root: Path, name: str) -> Path:
    return CLASSES[name](root, "train").pairs[0][1]


@pytest.mark.parametrize("name", ["camvid", "cityscapes", "ade20k"])
def test_unpaired_files_are_named(tmp_path, name):
    root = WRITERS[name](tmp_path / name)
    image, label = CLASSES[name](root, "train").pairs[0]
    label.unlink()
    with pytest.raises(ConfigError, match=r"1 image\(s\) without a label") as err:
        CLASSES[name](root, "train")
    assert image.name in str(err.value)
    save(label, np.zeros(HW, np.uint8))
    image.unlink()
    with pytest.raises(ConfigError, match=r"1 label\(s\) without an image") as err:
        CLASSES[name](root, "train")
    assert label.name in str(err.value)


def test_voc_list_naming_missing_files_names_them(tmp_path):
    write_voc(tmp_path)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages" / "2008_000001.jpg").unlink()
    (voc / "SegmentationClassAug" / "2008_000002.png").unlink()
    with pytest.raises(ConfigError, match=r"names 1 image file\(s\) that do not exist.*2008_000001\.jpg"):
        VOC(tmp_path, "train")
    save(voc / "JPEGImages" / "2008_000001.jpg", rgb_image(0))
    with pytest.raises(ConfigError, match=r"train_aug\.txt.*1 label file\(s\).*2008_000002\.png"):
        VOC(tmp_path, "train")


def test_voc_without_the_sbd_list_names_the_accepted_lists(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").unlink()
    with pytest.raises(ConfigError, match=r"no SBD training list.*trainaug\.txt.*SegmentationAug"):
        VOC(tmp_path, "train")
    assert len(VOC(tmp_path, "val")) == 2  # val does not need it


BAD_VALUES = {"camvid": 12, "cityscapes": 40, "voc": 21, "ade20k": 151}


@pytest.mark.parametrize("name", list(WRITERS))
def test_bad_label_value_names_file_and_value(tmp_path, name):
    root = WRITERS[name](tmp_path / name)
    label_path = _first_label(root, name)
    raw = np.asarray(Image.open(label_path)).copy()
    raw[0, 0] = BAD_VALUES[name]
    save(label_path, raw)
    ds = CLASSES[name](root, "train")
    with pytest.raises(ConfigError, match=rf"{label_path.name}.*\[{BAD_VALUES[name]}\]"):
        ds[0]


def test_16_bit_label_out_of_range_is_a_bad_value(tmp_path):
    root = write_ade20k(tmp_path)
    label_path = _first_label(root, "ade20k")
    raw = np.asarray(Image.open(label_path)).astype(np.uint16)
    raw[0, 0] = 1000
    save(label_path, raw)
    with pytest.raises(ConfigError, match=r"\[1000\]"):
        ADE20K(root, "train")[0]
    raw[0, 0] = 5  # 16-bit files with valid values are fine
    save(label_path, raw)
    assert ADE20K(root, "train")[0]["mask"][0, 0] == 4


def test_unreadable_image_and_colour_label_are_named(tmp_path):
    root = write_camvid(tmp_path)
    ds = CamVid(root, "train")
    image_path, label_path = ds.pairs[0]
    image_path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ConfigError, match=rf"cannot read image .*{image_path.name}"):
        ds[0]
    save(ds.pairs[1][1], rgb_image(0))
    with pytest.raises(ConfigError, match=rf"{ds.pairs[1][1].name}.*single-channel"):
        ds[1]


def test_size_mismatch_is_named(tmp_path):
    root = write_camvid(tmp_path)
    ds = CamVid(root, "train")
    save(ds.pairs[0][1], np.zeros((8, 8), np.uint8))
    with pytest.raises(ConfigError, match=rf"{ds.pairs[0][0].name}.*is \(16, 24\) but its label"):
        ds[0]


def test_unknown_split(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown split 'test'; choose one of \['train', 'val'\]"):
        VOC(write_voc(tmp_path), "test")


def test_datamodule_rejects_bad_palette_names_and_normalization(tmp_path):
    root = str(write_camvid(tmp_path))
    args = ("camvid", "rdd_lightning.data.CamVid", root, 11, [8, 8])
    with pytest.raises(ConfigError, match=r"dataset.palette has 2 colours but dataset.num_classes=11"):
        SegmentationDataModule(*args, palette=[[0, 0, 0], [1, 1, 1]])
    with pytest.raises(ConfigError, match=r"dataset.palette\[1\]=\[0, 0, 256\]"):
        SegmentationDataModule(*args, palette=[[0, 0, 0], [0, 0, 256], *[[0, 0, 0]] * 9])
    with pytest.raises(ConfigError, match=r"dataset.class_names has 1 names"):
        SegmentationDataModule(*args, class_names=["sky"])
    with pytest.raises(ConfigError, match=r"dataset.normalization='bgr'.*imagenet.*caffe"):
        SegmentationDataModule(*args, normalization="bgr")

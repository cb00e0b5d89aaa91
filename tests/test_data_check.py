"""`python -m rdd_lightning.check_data`: every bad file of every split is reported, with counts and frequencies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdd_lightning.check_data import check_dataset, format_report, main
from rdd_lightning.data import Cityscapes, SegmentationDataModule
from tests.test_data import HW, rgb_image, save, write_camvid, write_cityscapes


def datamodule(root: Path, name: str = "cityscapes", cls=Cityscapes) -> SegmentationDataModule:
    return SegmentationDataModule(
        name,
        f"rdd_lightning.data.{cls.__name__}",
        str(root),
        cls.NUM_CLASSES,
        crop_size=[8, 8],
        num_workers=0,
    )


def break_three_files(root: Path) -> list[str]:
    """One bad label value (train), one unreadable image (train), one size mismatch (val); their names."""
    train, val = Cityscapes(root, "train").pairs, Cityscapes(root, "val").pairs
    raw = np.asarray(Image.open(train[0][1])).copy()
    raw[0, 0] = 40
    save(train[0][1], raw)
    train[2][0].write_bytes(b"not a png")
    save(val[0][0], rgb_image(0, (8, 8)))
    return [train[0][1].name, train[2][0].name, val[0][0].name]


def test_good_dataset_counts_and_frequencies(tmp_path):
    root = write_cityscapes(tmp_path)
    report = check_dataset(datamodule(root))
    assert report.ok and [s.split for s in report.splits] == ["train", "val", "test"]
    train = report.splits[0]
    assert train.num_images == 3 and train.expected == 2975 and train.sizes == {HW: 3}
    labels = [np.asarray(Image.open(p[1])) for p in Cityscapes(root, "train").pairs]
    assert train.pixels.sum() == 3 * HW[0] * HW[1]
    assert train.pixels[13] == sum(int((lb == 26).sum()) for lb in labels)  # car
    assert train.pixels[-1] == sum(int(np.isin(lb, [0, 4]).sum()) for lb in labels)  # void
    text = format_report(report)
    assert "no problems in 5 image/label pairs" in text and "traffic light" in text


def test_every_bad_file_is_reported(tmp_path):
    root = write_cityscapes(tmp_path)
    names = break_three_files(root)
    report = check_dataset(datamodule(root))
    assert not report.ok and len(report.problems) == 3
    for name, problem in zip(names, report.problems, strict=True):
        assert name in problem
    assert "[40]" in report.problems[0] and report.problems[2].startswith("[val]")
    assert [s.num_bad for s in report.splits] == [2, 1, 0]
    assert report.splits[0].num_images == 3  # the other files were still read


def test_missing_split_is_a_problem_and_the_rest_is_scanned(tmp_path):
    root = write_camvid(tmp_path, {"train": 2, "val": 1})
    from rdd_lightning.data import CamVid

    report = check_dataset(datamodule(root, "camvid", CamVid))
    assert len(report.problems) == 1 and "no 'test' images" in report.problems[0]
    assert [s.num_images for s in report.splits] == [2, 1, 0]


def test_cli_reports_all_bad_files_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    root = write_cityscapes(tmp_path / "cityscapes")
    names = break_three_files(root)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "check_data",
            "dataset=cityscapes",
            f"dataset.root={root}",
            "num_workers=2",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert "3 problem(s):" in out and all(name in out for name in names)
    assert err.strip().splitlines()[-1].startswith("error: 3 problem(s) in dataset cityscapes")
    saved = json.loads((tmp_path / "run" / "check_data.json").read_text())
    assert saved["splits"]["train"]["images"] == 3 and len(saved["problems"]) == 3


def test_cli_config_error_is_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "check_data",
            "dataset=voc",
            f"dataset.root={tmp_path}",
            "dataset.num_classes=20",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dataset.num_classes=20" in errors[0]

"""Datasets (one module each), albumentations transforms and the LightningDataModule."""

from rdd_lightning.data.ade20k import ADE20K
from rdd_lightning.data.base import IGNORE_INDEX, SegmentationDataset
from rdd_lightning.data.camvid import CamVid
from rdd_lightning.data.cityscapes import Cityscapes
from rdd_lightning.data.datamodule import SegmentationDataModule
from rdd_lightning.data.synthetic import Synthetic
from rdd_lightning.data.voc import VOC

__all__ = [
    "ADE20K",
    "IGNORE_INDEX",
    "VOC",
    "CamVid",
    "Cityscapes",
    "SegmentationDataModule",
    "SegmentationDataset",
    "Synthetic",
]

"""Datasets (one module each), albumentations transforms and the LightningDataModule."""

from rdd_lightning.data.base import IGNORE_INDEX, SegmentationDataset
from rdd_lightning.data.camvid import CamVid
from rdd_lightning.data.datamodule import SegmentationDataModule
from rdd_lightning.data.synthetic import Synthetic

__all__ = ["IGNORE_INDEX", "CamVid", "SegmentationDataModule", "SegmentationDataset", "Synthetic"]

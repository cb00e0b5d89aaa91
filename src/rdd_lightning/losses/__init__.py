"""Loss functions other than RDD's own (see :mod:`rdd_lightning.rdd`): pure torch, no Lightning."""

from rdd_lightning.losses.kd import pixel_kd_loss
from rdd_lightning.losses.task import segmentation_ce_loss

__all__ = ["pixel_kd_loss", "segmentation_ce_loss"]

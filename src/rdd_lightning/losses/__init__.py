"""Loss functions other than RDD's own (see :mod:`rdd_lightning.rdd`): pure torch, no Lightning.

One module per method, each documenting its source, its default weights and where it differs from the
published code: :mod:`~rdd_lightning.losses.kd` (pixel KD), :mod:`~rdd_lightning.losses.task` (CE task loss),
:mod:`~rdd_lightning.losses.cwd`, :mod:`~rdd_lightning.losses.at`, :mod:`~rdd_lightning.losses.fitnet`,
:mod:`~rdd_lightning.losses.dist`, :mod:`~rdd_lightning.losses.skd`, :mod:`~rdd_lightning.losses.ifvd`,
:mod:`~rdd_lightning.losses.dsd` and :mod:`~rdd_lightning.losses.cirkd`. Every loss returns a 0-dim float32
tensor computed with autocast off; teacher inputs are detached.
"""

from rdd_lightning.losses.at import attention_map, attention_transfer_loss
from rdd_lightning.losses.cirkd import (
    CIRKDMemory,
    gather_across_processes,
    memory_contrast_loss,
    minibatch_pixel_relation_loss,
)
from rdd_lightning.losses.connector import FeatureConnector
from rdd_lightning.losses.cwd import channel_wise_divergence
from rdd_lightning.losses.dist import dist_loss
from rdd_lightning.losses.dsd import category_similarity_loss, pixel_similarity_loss
from rdd_lightning.losses.fitnet import hint_loss
from rdd_lightning.losses.ifvd import class_prototype_similarity, ifv_loss
from rdd_lightning.losses.kd import pixel_kd_loss
from rdd_lightning.losses.skd import (
    DISCRIMINATOR_LOSS_WEIGHT,
    DISCRIMINATOR_OPTIMIZER,
    SKDDiscriminator,
    discriminator_loss,
    generator_loss,
    pairwise_similarity_loss,
)
from rdd_lightning.losses.task import segmentation_ce_loss

__all__ = [
    "CIRKDMemory",
    "DISCRIMINATOR_LOSS_WEIGHT",
    "DISCRIMINATOR_OPTIMIZER",
    "FeatureConnector",
    "SKDDiscriminator",
    "attention_map",
    "attention_transfer_loss",
    "category_similarity_loss",
    "channel_wise_divergence",
    "class_prototype_similarity",
    "discriminator_loss",
    "dist_loss",
    "gather_across_processes",
    "generator_loss",
    "hint_loss",
    "ifv_loss",
    "memory_contrast_loss",
    "minibatch_pixel_relation_loss",
    "pairwise_similarity_loss",
    "pixel_kd_loss",
    "pixel_similarity_loss",
    "segmentation_ce_loss",
]

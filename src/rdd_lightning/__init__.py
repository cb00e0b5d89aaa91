"""rdd-lightning: Relative Difficulty Distillation for semantic segmentation with Lightning and Hydra."""

__version__ = "0.1.0"

from rdd_lightning import resolvers as _resolvers

_resolvers.register()

"""The one "float32 with autocast off" helper of the package, used by :mod:`rdd_lightning.rdd` and every loss.

Losses cast their inputs with ``.float()`` inside :func:`fp32_scope`, so their softmaxes, logarithms,
normalisations and reductions run in float32 even when the networks run under ``torch.autocast`` with
half-precision activations. Learnable layers (connectors, projection heads, discriminators) are *not* forced
to float32 by this helper unless a loss calls them inside the scope.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["fp32_scope"]


def fp32_scope(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Context manager that disables autocast on ``device``'s type, so math inside runs in the given dtypes.

    Args:
        device: the device (or its name) whose autocast to disable; usually the input tensor's ``.device``.

    Returns:
        ``torch.autocast(device_type, enabled=False)``, or a no-op context for device types autocast does not
        know.
    """
    device_type = torch.device(device).type
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - exotic device types
        return contextlib.nullcontext()

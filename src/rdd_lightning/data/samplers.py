"""Samplers that make training data a function of (seed, step) and count every evaluation image once.

Lightning's default (a ``DistributedSampler`` injected by the Trainer) has two properties this package does
not want: the training order depends on the number of processes and cannot be resumed mid-epoch, and the
evaluation sampler pads the last batch with repeated images, so a few images count twice in mIoU. The
datamodule therefore shards its own data (``trainer.use_distributed_sampler: false``):

* :class:`GlobalBatchSampler` draws the *global* batch of every step from a permutation seeded by
  ``(seed, epoch)`` and gives each process its slice, together with one augmentation seed per sample. The
  images and crops of step ``k`` are the same for 1 or N processes, and a run resumed at step ``k`` (also
  mid-epoch) continues with exactly the batches an uninterrupted run would have seen.
* :class:`ShardSampler` gives process ``r`` of ``W`` the indices ``r, r + W, r + 2W, ...``: every image is
  evaluated by exactly one process, with no padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler


def mix_seed(*values: int) -> int:
    """A 32-bit seed from several integers (numpy's ``SeedSequence``: well mixed, order-sensitive)."""
    return int(np.random.SeedSequence([int(v) % 2**63 for v in values]).generate_state(1)[0])


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(dataset index, augmentation seed)`` for one process of a data-parallel run.

    An epoch has ``len(self) = dataset_size // global_batch`` steps (the incomplete tail is dropped, as the
    paper's loaders do). Step ``j`` of epoch ``e`` uses positions ``[j*G, (j+1)*G)`` of the permutation seeded
    by ``(seed, e)``; process ``rank`` takes positions ``rank*P .. (rank+1)*P - 1`` of those, ``P = G /
    world_size``. The augmentation seed of a sample is a function of ``(seed, e, position)``.

    Args:
        dataset_size: images in the training set.
        global_batch: images per optimizer step over all processes (a multiple of ``world_size``).
        rank, world_size: this process and the number of processes.
        seed: the run's seed.
        position: ``() -> (epoch, batches already trained in it)``, called when an epoch's iterator is
            created (Lightning creates the first one before it calls :meth:`set_epoch`, so a run resumed in
            epoch 3, possibly mid-epoch, must read its place from the trainer). ``None``: the epoch given to
            :meth:`set_epoch`, from its first batch.
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        position: Callable[[], tuple[int, int]] | None = None,
    ):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not a multiple of {world_size} processes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.dataset_size, self.global_batch = int(dataset_size), int(global_batch)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.per_process = self.global_batch // self.world_size
        self.position = position
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.dataset_size // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.position() if self.position is not None else (self.epoch, 0)
        order = np.random.default_rng(mix_seed(self.seed, epoch)).permutation(self.dataset_size)
        for step in range(max(0, start), len(self)):
            first = step * self.global_batch + self.rank * self.per_process
            positions = range(first, first + self.per_process)
            yield [(int(order[p]), mix_seed(self.seed, epoch, p)) for p in positions]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(dataset_size)``: no padding, no repeats."""

    def __init__(self, dataset_size: int, rank: int = 0, world_size: int = 1):
        self.dataset_size, self.rank, self.world_size = int(dataset_size), int(rank), int(world_size)

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_size, self.world_size))

"""Faults injected into real runs by tests (a callback a test adds with ``+callbacks.<name>._target_=...``)."""

from __future__ import annotations

import lightning as L


class RankFault(L.Callback):
    """Raise in the training step ``step`` of global rank ``rank`` when ``seed == fail_seed`` (one job of a
    seed sweep fails, on one rank only), like an out-of-memory error on one GPU."""

    def __init__(self, rank: int, seed: int, fail_seed: int, step: int = 1):
        self.rank, self.fail = int(rank), int(seed) == int(fail_seed)
        self.step = int(step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.fail and trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected fault on rank {self.rank} at step {self.step}")


class ScrambleStudent(L.Callback):
    """Replace the student's weights with seeded noise when training starts (after a checkpoint was restored),
    so that every later validation is worse than the restored run's best."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for p in pl_module.student.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

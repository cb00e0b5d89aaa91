"""The datamodule's samplers: the global batch of a step does not depend on the number of processes, a
mid-epoch resume continues with the batches an uninterrupted run sees, and evaluation sees each image once."""

from __future__ import annotations

import numpy as np
import pytest

from rdd_lightning.data.samplers import GlobalBatchSampler, ShardSampler, mix_seed


def reference_epoch(n: int, global_batch: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """Straightforward statement of the intended stream: a permutation per (seed, epoch), cut into global
    batches in order, the incomplete tail dropped, one augmentation seed per (seed, epoch, position)."""
    order = np.random.default_rng(mix_seed(seed, epoch)).permutation(n)
    batches = []
    for step in range(n // global_batch):
        positions = range(step * global_batch, (step + 1) * global_batch)
        batches.append([(int(order[p]), mix_seed(seed, epoch, p)) for p in positions])
    return batches


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_global_batches_are_the_same_for_any_number_of_processes(world_size):
    n, global_batch, seed = 23, 8, 5
    samplers = [GlobalBatchSampler(n, global_batch, rank, world_size, seed) for rank in range(world_size)]
    for epoch in (0, 3):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        joined = [sum((per_rank[r][step] for r in range(world_size)), []) for step in range(len(samplers[0]))]
        assert joined == reference_epoch(n, global_batch, seed, epoch)
        assert all(len(b) == global_batch // world_size for rank in per_rank for b in rank)


def test_epochs_and_seeds_reshuffle():
    first = reference_epoch(16, 4, seed=0, epoch=0)
    assert (
        reference_epoch(16, 4, seed=0, epoch=1) != first and reference_epoch(16, 4, seed=1, epoch=0) != first
    )
    assert sorted(i for b in first for i, _ in b) == list(range(16))  # a permutation: every image once


def test_resume_position_continues_the_epoch():
    sampler = GlobalBatchSampler(20, 4, rank=1, world_size=2, seed=3, position=lambda: (2, 3))
    full = reference_epoch(20, 4, seed=3, epoch=2)
    assert list(sampler) == [batch[2:4] for batch in full[3:]]  # rank 1's half of steps 3 and 4


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="not a multiple of 3"):
        GlobalBatchSampler(10, 4, rank=0, world_size=3)


@pytest.mark.parametrize(("n", "world_size"), [(5, 2), (7, 3), (2, 4)])
def test_shards_cover_every_image_exactly_once(n, world_size):
    shards = [list(ShardSampler(n, rank, world_size)) for rank in range(world_size)]
    assert sorted(sum(shards, [])) == list(range(n))
    assert [len(ShardSampler(n, r, world_size)) for r in range(world_size)] == [len(s) for s in shards]


def test_loader_workers_are_capped_at_the_cpus_per_process(tmp_path, monkeypatch):
    from hydra.utils import instantiate

    from tests.conftest import compose_train_cfg

    cfg = compose_train_cfg(tmp_path, ["dataset=camvid", "dataset.num_workers=4"])
    datamodule = instantiate(cfg.dataset, _convert_="all")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert datamodule._workers() == 2  # 2 CPUs, one process: not the configured 4

    class Trainer:  # 2 processes of a DDP run on this machine share the 2 CPUs
        global_rank, world_size, num_nodes = 0, 2, 1

    datamodule.trainer = Trainer()
    assert datamodule._workers() == 1

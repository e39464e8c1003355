import itertools

import numpy as np
import pytest

from group_by_aspect_ratio import GroupedBatchSampler, aspect_ratio_group_ids


def test_group_ids_split_portrait_and_landscape():
    ids = aspect_ratio_group_ids([0.5, 0.75, 1.0, 1.33, 2.0], group_factor=0)
    assert ids[0] == ids[1] != ids[3] == ids[4]


def test_negative_factor_puts_everything_in_one_group():
    assert set(aspect_ratio_group_ids([0.5, 1.0, 2.0], group_factor=-1)) == {0}


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_every_index_once_and_one_group_per_batch(batch_size):
    rng = np.random.default_rng(0)
    group_ids = aspect_ratio_group_ids(rng.uniform(0.4, 2.5, 37).tolist(), group_factor=3)
    sampler = GroupedBatchSampler(group_ids, batch_size, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(itertools.chain(*batches)) == list(range(37))
        assert all(len({group_ids[i] for i in batch}) == 1 for batch in batches)
        assert all(1 <= len(batch) <= batch_size for batch in batches)


def test_epochs_shuffle_differently_and_reproducibly():
    sampler = GroupedBatchSampler([0] * 20, 4, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_batch_counts_covering_all_indices(world_size):
    group_ids = [0] * 7 + [1] * 5 + [2]
    per_rank = [
        list(GroupedBatchSampler(group_ids, 2, num_replicas=world_size, rank=r, seed=0))
        for r in range(world_size)
    ]
    lengths = {len(batches) for batches in per_rank}
    assert len(lengths) == 1
    # The i-th batch has the same size on every rank, as DDP needs for balanced steps.
    for step in zip(*per_rank, strict=True):
        assert len({len(batch) for batch in step}) == 1
        assert len({group_ids[i] for batch in step for i in batch}) == 1
    seen = {i for batches in per_rank for batch in batches for i in batch}
    assert seen == set(range(len(group_ids)))

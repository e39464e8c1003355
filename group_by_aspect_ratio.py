"""Batches of images of one aspect-ratio group, sharded over distributed ranks."""

import math

import numpy as np
import torch


def aspect_ratio_group_ids(aspect_ratios, group_factor):
    """Quantizes width/height ratios into 2 * group_factor + 2 log-spaced bins around 1.

    A negative factor puts every image in one group, which turns grouping off.
    """
    if group_factor < 0:
        return [0] * len(aspect_ratios)
    bins = 2 ** np.linspace(-1, 1, 2 * group_factor + 1) if group_factor > 0 else [1.0]
    return np.digitize(aspect_ratios, bins).tolist()


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches whose images all come from one aspect-ratio group.

    Each epoch shuffles the whole dataset with `seed + epoch` (the same on every rank), splits
    each group into chunks of `batch_size * num_replicas` images, and gives each rank its slice
    of every chunk. All ranks thus get the same number of batches, which DDP needs. Without
    distribution every index appears exactly once per epoch; a group's last batch may be
    smaller. With it, a group's last chunk repeats its own images so that every rank gets a
    batch of the same size, as DistributedSampler pads.
    """

    def __init__(self, group_ids, batch_size, num_replicas=1, rank=0, seed=0):
        self.group_ids = np.asarray(group_ids)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch, start_batch=0):
        """Selects the epoch's order; `start_batch` skips batches a resumed run already took."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _chunks(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.group_ids))
        chunk_size = self.batch_size * self.num_replicas
        chunks = []
        for group in np.unique(self.group_ids):
            members = order[self.group_ids[order] == group]
            chunks += [members[i : i + chunk_size] for i in range(0, len(members), chunk_size)]
        return [chunks[i] for i in rng.permutation(len(chunks))]

    def _rank_slice(self, chunk):
        per_rank = math.ceil(len(chunk) / self.num_replicas)
        padded = np.resize(chunk, per_rank * self.num_replicas)
        return padded[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()

    def __iter__(self):
        for chunk in self._chunks()[self.start_batch :]:
            yield self._rank_slice(chunk)

    def __len__(self):
        return self.batches_per_epoch() - self.start_batch

    def batches_per_epoch(self):
        chunk_size = self.batch_size * self.num_replicas
        _, counts = np.unique(self.group_ids, return_counts=True)
        return int(sum(math.ceil(c / chunk_size) for c in counts))

"""train.py with fault and recording hooks, launched like train.py by tests/test_distributed.py.

Environment variables switch the hooks on:
    DIST_TEST_RECORD_DIR  each rank writes the dataset indices of its training batches, per epoch,
                          to <dir>/batches_<rank>.json
    DIST_TEST_HANG_RANK   this rank stops responding before its first training iteration, as a
                          worker stuck in I/O would
    DIST_TEST_EMPTY_IDS   comma-separated image ids whose detections evaluation drops
"""

import atexit
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import coco_eval  # noqa: E402
import group_by_aspect_ratio  # noqa: E402
import train  # noqa: E402


def record_batches(directory, rank):
    batches = {}
    original_iter = group_by_aspect_ratio.GroupedBatchSampler.__iter__

    def recording_iter(self):
        for batch in original_iter(self):
            batches.setdefault(self.epoch, []).append(batch)
            yield batch

    def write():
        with open(os.path.join(directory, f"batches_{rank}.json"), "w") as f:
            json.dump(batches, f)

    group_by_aspect_ratio.GroupedBatchSampler.__iter__ = recording_iter
    atexit.register(write)


def hang_before_training():
    original = train.train_one_epoch

    def stuck_train_one_epoch(*args, **kwargs):
        time.sleep(3600)
        return original(*args, **kwargs)

    train.train_one_epoch = stuck_train_one_epoch


def drop_detections(image_ids):
    original_update = coco_eval.CocoEvaluator.update

    def update(self, predictions):
        predictions = {
            image_id: {k: v[:0] for k, v in p.items()} if int(image_id) in image_ids else p
            for image_id, p in predictions.items()
        }
        original_update(self, predictions)

    coco_eval.CocoEvaluator.update = update


if __name__ == "__main__":
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if "DIST_TEST_RECORD_DIR" in os.environ:
        record_batches(os.environ["DIST_TEST_RECORD_DIR"], rank)
    if os.environ.get("DIST_TEST_HANG_RANK") == rank:
        hang_before_training()
    if "DIST_TEST_EMPTY_IDS" in os.environ:
        drop_detections({int(i) for i in os.environ["DIST_TEST_EMPTY_IDS"].split(",")})
    train.cli()

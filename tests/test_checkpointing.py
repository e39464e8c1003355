"""Checkpointer, BestMetric, StopSignal and pruning, on a one-layer model (no training run)."""

import os
import signal

import pytest
import torch

import checkpointing
from errors import CheckpointError


class StopNever:
    def exit_code(self):
        return 143


class FailsHalfway:
    """Writing it fails after torch.save has begun the file, as a full disk would."""

    def __reduce__(self):
        raise OSError("No space left on device")


def make_checkpointer(tmp_path, every=None, keep_last=None):
    model = torch.nn.Linear(2, 1)
    training = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    checkpointer = checkpointing.Checkpointer(
        str(tmp_path), training, {"args": {"model": "linear"}}, 5, StopNever(), every, keep_last
    )
    return checkpointer, model


def load(path):
    return torch.load(path, weights_only=True)


def test_end_of_epoch_writes_a_plain_dict_kept_per_epoch(tmp_path):
    checkpointer, model = make_checkpointer(tmp_path)
    checkpointer.end_of_epoch(0)
    saved = load(tmp_path / "checkpoint.pth")
    assert saved["epoch"] == 0 and "iteration" not in saved
    assert saved["args"] == {"model": "linear"}
    assert torch.equal(saved["model"]["weight"], model.weight.detach())
    assert load(tmp_path / "model_0.pth")["epoch"] == 0
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_mid_epoch_checkpoints_every_n_iterations_but_not_at_the_epoch_end(tmp_path):
    checkpointer, _ = make_checkpointer(tmp_path, every=2)
    checkpointer.after_step(3, 2, stopping=False)
    assert load(tmp_path / "checkpoint.pth")["iteration"] == 2
    checkpointer.after_step(3, 3, stopping=False)
    assert load(tmp_path / "checkpoint.pth")["iteration"] == 2
    os.remove(tmp_path / "checkpoint.pth")
    checkpointer.after_step(3, 4, stopping=False)
    os.remove(tmp_path / "checkpoint.pth")
    # The 5th of 5 iterations: end_of_epoch writes that one.
    checkpointer.after_step(3, 5, stopping=False)
    assert not (tmp_path / "checkpoint.pth").exists()


def test_stopping_saves_the_step_then_raises_with_the_signal_exit_code(tmp_path):
    checkpointer, _ = make_checkpointer(tmp_path)
    with pytest.raises(checkpointing.TrainingStopped) as stopped:
        checkpointer.after_step(1, 3, stopping=True)
    assert stopped.value.exit_code == 143
    assert load(tmp_path / "checkpoint.pth")["iteration"] == 3


def test_best_stays_the_epoch_it_was_kept_at(tmp_path):
    checkpointer, model = make_checkpointer(tmp_path, keep_last=1)
    checkpointer.end_of_epoch(0)
    checkpointer.keep_as_best()
    with torch.no_grad():
        model.weight.add_(1)
    checkpointer.end_of_epoch(1)
    assert load(tmp_path / "model_best.pth")["epoch"] == 0
    assert load(tmp_path / "checkpoint.pth")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "model_1.pth", "model_best.pth"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    checkpointing.save_atomically({"epoch": 1}, path)
    with pytest.raises(OSError, match="No space left"):
        checkpointing.save_atomically({"epoch": 2, "state": FailsHalfway()}, path)
    assert load(path) == {"epoch": 1}


def test_pruning_keeps_the_newest_epochs_and_every_other_file(tmp_path):
    names = ["model_1.pth", "model_2.pth", "model_10.pth", "checkpoint.pth", "model_best.pth"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    checkpointing.prune_epoch_checkpoints(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == sorted(["model_2.pth", "model_10.pth", *names[3:]])
    checkpointing.prune_epoch_checkpoints(str(tmp_path), keep_last=None)
    assert len(os.listdir(tmp_path)) == 4


def test_best_metric_counts_evaluations_since_the_best_and_ignores_missing_values():
    best = checkpointing.BestMetric("segm_AP", patience=2)
    assert best.update(0, 0.1)["epoch"] == 0
    assert best.update(1, 0.3) == {"metric": "segm_AP", "epoch": 1, "value": 0.3}
    best.update(2, 0.3)  # equal is no improvement
    assert not best.exhausted()
    best.update(3, None)
    assert best.exhausted() and best.since == 2
    assert "epoch 1" in best.stop_message()
    replayed = checkpointing.BestMetric("segm_AP", 2, history=[(0, 0.1), (1, 0.3), (2, 0.3)])
    assert (replayed.epoch, replayed.since) == (1, 1)
    assert not checkpointing.BestMetric("segm_AP").exhausted()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_becomes_its_exit_code_and_the_old_handler_comes_back(signum):
    before = signal.getsignal(signum)
    with checkpointing.StopSignal() as stop:
        stop.exit_if_requested()
        os.kill(os.getpid(), signum)
        assert stop.received_here()
        with pytest.raises(checkpointing.TrainingStopped) as stopped:
            stop.exit_if_requested()
    assert stopped.value.exit_code == 128 + signum
    assert signal.getsignal(signum) is before


def test_reading_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint\nsecond line")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint") as error:
        checkpointing.read_checkpoint(str(path))
    assert "\n" not in error.value.message
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="needs model, epoch, args"):
        checkpointing.read_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="no such file"):
        checkpointing.read_checkpoint(str(tmp_path / "missing.pth"))

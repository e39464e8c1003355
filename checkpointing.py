"""Checkpoints: when, what and where a run saves (Checkpointer), the best evaluation and
--patience (BestMetric), stopping cleanly on SLURM's pre-emption signals (StopSignal), atomic
writes, pruning old epochs, and reading a checkpoint back: the one place a file is opened with
torch.load."""

import os
import re
import shutil
import signal

import torch

import utils
from errors import CheckpointError, TrainingStopped, first_line


def save_atomically(obj, path):
    """Writes `obj` with torch.save atomically: a crash leaves the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(tmp_path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    # The rename itself is only durable once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def link_or_copy(source, destination):
    """Makes `destination` hold `source`'s bytes: a hard link where the file system allows it
    (instant, and the next atomic write of `source` leaves it untouched), else a copy."""
    tmp_path = os.path.join(os.path.dirname(destination), f".{os.path.basename(destination)}.tmp")
    if os.path.exists(tmp_path):
        os.remove(tmp_path)
    try:
        os.link(source, tmp_path)
    except OSError:
        shutil.copyfile(source, tmp_path)
    os.replace(tmp_path, destination)


def prune_epoch_checkpoints(output_dir, keep_last):
    """Deletes all but the newest `keep_last` model_<epoch>.pth files."""
    if keep_last is None:
        return
    epochs = sorted(
        int(match.group(1))
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(r"model_(\d+)\.pth", name))
    )
    for epoch in epochs[: max(len(epochs) - keep_last, 0)]:
        os.remove(os.path.join(output_dir, f"model_{epoch}.pth"))


def rng_states():
    """The generators training draws from (RPN and RoI sampling), for an exact mid-epoch resume.

    Augmentations draw from per-sample seeds (coco_utils) and batch order from the sampler's
    seed, and neither numpy's nor Python's global generator is used in a training step.
    """
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (SLURM's pre-emption signals) so that training can stop
    cleanly after the current iteration instead of dying in the middle of one. A context
    manager: the previous handlers come back on exit.

    Every rank must stop at the same iteration: each step ORs the ranks' flags in the loss
    reduction it makes anyway (reduce_losses), and `exit_if_requested` does its own collective,
    once per epoch.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.received = signum
        print(f"received {signal.Signals(signum).name}: stopping after this iteration", flush=True)

    def received_here(self):
        """Whether this rank got a signal."""
        return self.received is not None

    def exit_if_requested(self):
        """Raises TrainingStopped on every rank once any rank got a signal."""
        if utils.any_rank(self.received_here()):
            raise TrainingStopped(self.exit_code())

    def exit_code(self):
        """128 + the signal number, as for a process the signal killed (143 for SIGTERM)."""
        return 128 + (self.received or signal.SIGTERM)


class Checkpointer:
    """When, what and where a run saves.

    When: at every epoch end; inside an epoch every `every` iterations; and after the step at
    which any rank got a stop signal (then TrainingStopped is raised). What: a plain dict (model,
    optimizer, schedule, scaler, epoch, iteration within the epoch when mid-epoch, the random
    generators, and the run's `metadata`: args, classes, ...) that loads with weights_only=True;
    only the main process builds it. Where: `<output_dir>/checkpoint.pth`, written atomically;
    each epoch's is also kept as model_<epoch>.pth, of which the newest `keep_last` stay.
    """

    def __init__(
        self,
        output_dir,
        training,
        metadata,
        iters_per_epoch,
        stop_signal,
        every=None,
        keep_last=None,
    ):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "checkpoint.pth")
        self.training = training  # {"model": ..., "optimizer": ..., "lr_scheduler": ..., ...}
        self.metadata = metadata
        self.iters_per_epoch = iters_per_epoch
        self.stop_signal = stop_signal
        self.every = every
        self.keep_last = keep_last

    def state(self, epoch, iteration=None):
        state = {name: obj.state_dict() for name, obj in self.training.items() if obj is not None}
        state.update(self.metadata, epoch=epoch, rng=rng_states())
        if iteration is not None:
            state["iteration"] = iteration
        return state

    def save(self, epoch, iteration=None):
        if utils.is_main_process():
            save_atomically(self.state(epoch, iteration), self.path)

    def after_step(self, epoch, done, stopping):
        """After `done` iterations of `epoch`: a mid-epoch checkpoint when one is due."""
        due = self.every and done % self.every == 0 and done < self.iters_per_epoch
        if due or stopping:
            self.save(epoch, done)
        if stopping:
            raise TrainingStopped(self.stop_signal.exit_code())

    def keep_as_best(self):
        """model_best.pth: the last epoch's checkpoint, which --keep-last never deletes."""
        if utils.is_main_process():
            link_or_copy(self.path, os.path.join(self.output_dir, "model_best.pth"))

    def end_of_epoch(self, epoch):
        """checkpoint.pth for the finished epoch, kept as model_<epoch>.pth."""
        self.save(epoch)
        if utils.is_main_process():
            link_or_copy(self.path, os.path.join(self.output_dir, f"model_{epoch}.pth"))
            prune_epoch_checkpoints(self.output_dir, self.keep_last)


class BestMetric:
    """The best value of a metric (higher is better) over a run's evaluations, and how many
    evaluations ago it was reached, for model_best.pth and --patience. `history` replays the
    (epoch, value) pairs of a resumed run's earlier evaluations."""

    def __init__(self, name, patience=None, history=()):
        self.name = name
        self.patience = patience
        self.epoch = self.value = None
        self.since = 0
        for epoch, value in history:
            self.update(epoch, value)

    def update(self, epoch, value):
        """Takes the metric's value at `epoch` (None: not computed); returns the best so far."""
        if value is not None and (self.value is None or value > self.value):
            self.epoch, self.value, self.since = epoch, value, 0
        else:
            self.since += 1
        return {"metric": self.name, "epoch": self.epoch, "value": self.value}

    def exhausted(self):
        return self.patience is not None and self.since >= self.patience

    def stop_message(self):
        return (
            f"early stop: {self.name} has not improved for {self.since} evaluations (best "
            f"{self.value} at epoch {self.epoch}, kept as model_best.pth); resume with a larger "
            "--patience to go on"
        )


def read_checkpoint(path):
    """A checkpoint dict written by train.py (loaded with weights_only=True), or CheckpointError."""
    return checked_checkpoint(load_file(path), path)


def load_file(path):
    """What torch.save wrote to `path` (loaded with weights_only=True), or CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first_line(e)})") from e


def checked_checkpoint(checkpoint, path):
    """`checkpoint` when it is a dict as train.py writes them, else CheckpointError."""
    if not isinstance(checkpoint, dict) or not {"model", "epoch", "args"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this repo (needs model, epoch, args)")
    return checkpoint

"""Logging, distributed and checkpoint helpers: MetricLogger, the launcher's environment and the
process group, reductions, atomic checkpoint files and the Checkpointer that decides when to
write them, stop signals. Imports only torch, the standard library and errors.py."""

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from errors import CheckpointError, ConfigError


class SmoothedValue:
    """Tracks a series of values: a windowed median/average for display and a global average."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.window = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.window.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self):
        return torch.tensor(list(self.window)).median().item()

    @property
    def avg(self):
        return sum(self.window) / len(self.window)

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.window)

    @property
    def value(self):
        return self.window[-1]

    def __str__(self):
        return self.fmt.format(
            median=self.median,
            avg=self.avg,
            global_avg=self.global_avg,
            max=self.max,
            value=self.value,
        )


class MetricLogger:
    """Prints one line every `print_freq` iterations: progress, ETA, meters, timing and memory."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values):
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(value)

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def global_averages(self):
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq, header=""):
        """Yields the items of `iterable`, timing each step and the wait for its data."""
        start = time.time()
        end = start
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        total = len(iterable)
        width = len(str(total))
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [
                    header,
                    f"[{i:>{width}}/{total}]",
                    f"eta: {eta}",
                    str(self),
                    f"time: {iter_time}",
                    f"data: {data_time}",
                ]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
                print_main(self.delimiter.join(parts), flush=True)
            end = time.time()
        if total == 0:  # a resumed epoch that had already taken all its batches
            return
        total_time = datetime.timedelta(seconds=int(time.time() - start))
        print_main(
            f"{header} total time: {total_time} ({(time.time() - start) / total:.4f} s / it)"
        )


def collate_fn(batch):
    images, targets = zip(*batch, strict=True)
    if torch.utils.data.get_worker_info() is not None:
        images, targets = in_one_shared_buffer(images, targets)
    return images, targets


def in_one_shared_buffer(images, targets):
    """The batch with all its tensors copied into one shared-memory buffer (views of it), so that
    a DataLoader worker hands it over as one storage rather than one per tensor: each storage
    crossing between processes has a fixed cost (benchmarks/data_bench.py measures it)."""
    tensors = [*images, *(v for target in targets for v in target.values() if torch.is_tensor(v))]
    sizes = [t.numel() * t.element_size() for t in tensors]
    # 64-byte aligned offsets, so that every view keeps its dtype's alignment
    ends = [0]
    for size in sizes:
        ends.append(ends[-1] + (size + 63) // 64 * 64)
    buffer = torch.empty(ends[-1], dtype=torch.uint8).share_memory_()
    views = {}
    for tensor, start, size in zip(tensors, ends[:-1], sizes, strict=True):
        view = buffer[start : start + size].view(tensor.dtype).view(tensor.shape)
        views[id(tensor)] = view.copy_(tensor)
    images = tuple(views[id(image)] for image in images)
    targets = tuple(
        {k: views[id(v)] if torch.is_tensor(v) else v for k, v in target.items()}
        for target in targets
    )
    return images, targets


# Distributed


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def print_main(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs)


def _dist_device():
    """The device collectives run on: nccl needs CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launcher_environment(local_rank_arg=None):
    """Rank, world size and local rank from torchrun/torch.distributed.launch or SLURM, or None.

    Returns None for a plain `python train.py` (no launcher), and also under a SLURM allocation
    with a single task, so that an interactive job on a SLURM node still runs undistributed.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local_rank = int(env.get("LOCAL_RANK", local_rank_arg or 0))
        return int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    return None


def slurm_master_address(env):
    """MASTER_ADDR and MASTER_PORT for tasks started by srun, the same on every task.

    The environment's values win; otherwise the address is the first host of the step's (or
    job's) node list, where task 0 runs, and the port is derived from the job id, so that two
    jobs sharing a node do not collide.
    """
    address = env.get("MASTER_ADDR")
    if not address:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ConfigError("SLURM gives no node list: set MASTER_ADDR to task 0's host")
        address = first_host(nodelist)
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return address, port


def first_host(nodelist):
    """The first host of a SLURM node list such as "gpu[03-05,09],cpu1" (gpu03).

    Asks `scontrol show hostnames` where it is installed; otherwise expands the first name
    itself, taking the first value of every bracketed range.
    """
    try:
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    except OSError:
        pass
    name = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist).group(0)
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", name)


def init_distributed_mode(args):
    """Joins the process group described by the launcher's environment; sets args.distributed.

    Every collective (and the rendezvous) fails after `args.dist_timeout` seconds instead of
    waiting forever for a rank that died or hangs; on nccl this relies on torch's default
    TORCH_NCCL_ASYNC_ERROR_HANDLING, which tears the process down when a collective times out.
    """
    launched = launcher_environment(args.local_rank)
    if launched is None:
        args.distributed, args.rank, args.world_size = False, 0, 1
        return
    args.rank, args.world_size, local_rank = launched
    args.distributed = True
    if args.device.startswith("cuda"):
        # Under srun with --gpus-per-task a task sees one device whatever its local rank.
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        args.device = f"cuda:{gpu}"
    backend = args.dist_backend or ("nccl" if args.device.startswith("cuda") else "gloo")
    if "RANK" not in os.environ:  # srun: torchrun would have set the rendezvous address
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = slurm_master_address(os.environ)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        backend=backend,
        init_method=args.dist_url,
        world_size=args.world_size,
        rank=args.rank,
        timeout=datetime.timedelta(seconds=args.dist_timeout),
    )
    print_main(f"distributed: {args.world_size} processes, backend {backend}, {args.dist_url}")
    dist.barrier()


def destroy_distributed():
    """Releases the process group at the end of a run (torch warns about one left open)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def reduce_losses(losses, flag=False):
    """Averages a dict of scalar loss tensors over all ranks, and ORs a flag of every rank into
    the same all_reduce (a stop signal), so a step needs one collective; returns both."""
    world_size = get_world_size()
    if world_size == 1:
        return losses, flag
    names = sorted(losses)
    stacked = torch.stack(
        [*(losses[name].detach().float() for name in names), torch.tensor(float(flag))]
    ).to(_dist_device())
    dist.all_reduce(stacked)
    averages = stacked[:-1] / world_size
    return dict(zip(names, averages, strict=True)), bool(stacked[-1] > 0)


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (a Python object)."""
    if not is_dist_avail_and_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# Checkpoints and logs


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


class TrainingStopped(Exception):
    """Training stopped on a signal after writing a checkpoint; the process exits `exit_code`."""

    def __init__(self, exit_code):
        super().__init__(f"stopped by a signal; exit code {exit_code}")
        self.exit_code = exit_code


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
        flag = torch.tensor([self.received_here()], dtype=torch.float32)
        if is_dist_avail_and_initialized():
            flag = flag.to(_dist_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
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
        if is_main_process():
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
        if is_main_process():
            link_or_copy(self.path, os.path.join(self.output_dir, "model_best.pth"))

    def end_of_epoch(self, epoch):
        """checkpoint.pth for the finished epoch, kept as model_<epoch>.pth."""
        self.save(epoch)
        if is_main_process():
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
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first_line})") from e


def checked_checkpoint(checkpoint, path):
    """`checkpoint` when it is a dict as train.py writes them, else CheckpointError."""
    if not isinstance(checkpoint, dict) or not {"model", "epoch", "args"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this repo (needs model, epoch, args)")
    return checkpoint


def write_json_on_master(path, record):
    if is_main_process():
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


def read_jsonl(path):
    """The records of a JSON-lines file; none when it does not exist."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path, record):
    if is_main_process():
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def git_revision():
    """The checked-out commit, so that a log says which code produced it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return result.stdout.strip() or "unknown"

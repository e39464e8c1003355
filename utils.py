"""Logging and distributed helpers: MetricLogger, the launcher's environment and the process
group, reductions, JSON logs, the git revision. Imports only torch, the standard library and
errors.py (checkpoints are checkpointing.py's)."""

import datetime
import json
import os
import re
import subprocess
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from errors import ConfigError


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


def device_or_default(name):
    """`name`, or cuda when a CUDA device is available, else cpu: every command's --device."""
    if name is not None:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def any_rank(flag):
    """Whether `flag` is true on any rank (a collective every rank must make)."""
    value = torch.tensor([float(flag)])
    if is_dist_avail_and_initialized():
        value = value.to(_dist_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (a Python object)."""
    if not is_dist_avail_and_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# Logs


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

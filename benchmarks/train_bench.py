"""Training iterations per second and peak memory for one model, batch and image size, with
and without mixed precision, and what this repo's training step costs over a bare loop:
engine.train_one_epoch (logging, loss reduction, finiteness check, scheduler) against the
plainest loop over the same torchvision model, optimizer and batches, in the same run.

    pip install psutil
    python benchmarks/train_bench.py --json train_bench.json
    python benchmarks/train_bench.py --device cuda --size 800 --iters 50 --json train_bench.json

The model, optimizer and scheduler come from train.py's own functions and flags. The batches
(generated COCO-like images through this repo's dataset and hflip recipe) are made once and
held in memory, so data loading is not timed. Every run starts from the same weights and
seed, after one untimed run; the engine and bare runs alternate. Peak memory is
torch.cuda.max_memory_allocated on CUDA and the rise of the process's RSS (sampled every 5 ms)
on the CPU.

The engine's own cost is also measured on a stub model whose step takes next to no time: the
difference per iteration is the engine's overhead, given as a share of the real bare step.
"""

import argparse
import contextlib
import copy
import io
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import synthetic  # noqa: E402

import coco_utils  # noqa: E402
import engine  # noqa: E402
import presets  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402

MODES = ("bare", "engine")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="maskrcnn_resnet50_fpn", help="torchvision model name")
    parser.add_argument("--size", type=int, default=160, help="--min-size and --max-size")
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch")
    parser.add_argument("--iters", type=int, default=8, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each loop")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "amp"],
        default=["fp32", "amp"],
        help="amp: train.py's --amp (float16 on CUDA, bfloat16 on the CPU)",
    )
    parser.add_argument("--stub-iters", type=int, default=300, help="iterations of the stub")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device"
    )
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    return parser


def make_batches(args):
    image_dir, ann_file = synthetic.coco_like_images()
    dataset = coco_utils.CocoDetection(
        image_dir,
        ann_file,
        presets.DetectionPresetTrain("hflip", min_size=args.size, max_size=args.size),
        drop_images_without_objects=True,
        sample_seed=0,
    )
    needed = (args.warmup + args.iters) * args.batch_size
    samples = [dataset[i % len(dataset)] for i in range(needed)]
    return [
        utils.collate_fn(samples[i : i + args.batch_size])
        for i in range(0, needed, args.batch_size)
    ]


def train_args(args, amp):
    flags = ["--model", args.model, "--min-size", str(args.size), "--max-size", str(args.size)]
    flags += ["-b", str(args.batch_size), "--lr", "0.01", "--device", args.device]
    return train.get_args_parser().parse_args(flags + (["--amp"] if amp else []))


def bare_loop(model, optimizer, batches, device, amp, scaler):
    """What a training loop needs and nothing else."""
    model.train()
    device_type = torch.device(device).type
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    for images, targets in batches:
        images, targets = engine.to_device(images, targets, device)
        with torch.autocast(device_type, dtype=dtype, enabled=amp):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()


class PeakMemory:
    """Peak memory over a block: CUDA's allocator statistics, or the process's RSS rise."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss - self.start)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.done.set()
            self.thread.join()


def timed_run(mode, model, initial, batches, args, train_flags):
    """Seconds per iteration and peak memory of one run from the initial weights."""
    model.load_state_dict(initial)
    torch.manual_seed(0)
    optimizer = train.get_optimizer(train_flags, model)
    lr_scheduler = train.get_lr_scheduler(train_flags, optimizer, len(batches))
    device = args.device
    scaler = torch.amp.GradScaler("cuda") if train_flags.amp and "cuda" in device else None

    def run(part):
        if mode == "bare":
            bare_loop(model, optimizer, part, device, train_flags.amp, scaler)
        else:
            engine.train_one_epoch(
                model, optimizer, lr_scheduler, part, device, 0, train_flags, scaler
            )

    with PeakMemory(device) as memory, contextlib.redirect_stdout(io.StringIO()):
        run(batches[: args.warmup])
        synchronize(device)
        start = time.perf_counter()
        run(batches[args.warmup :])
        synchronize(device)
        seconds = (time.perf_counter() - start) / (len(batches) - args.warmup)
    return seconds, memory.peak


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StubDetector(torch.nn.Module):
    """Returns a detector's five losses from one parameter: a step that costs almost nothing."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(5))

    def forward(self, images, targets):
        names = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn")
        return {name: self.weight[i] * 0.1 for i, name in enumerate(names)}


def stub_overhead(args, batches, train_flags):
    """Seconds per iteration of the engine minus the bare loop, both around the stub."""
    stub = StubDetector().to(args.device)
    initial = copy.deepcopy(stub.state_dict())
    many = [batches[i % len(batches)] for i in range(args.warmup + args.stub_iters)]
    stub_args = argparse.Namespace(**{**vars(args), "iters": args.stub_iters})
    times = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            times[mode].append(timed_run(mode, stub, initial, many, stub_args, train_flags)[0])
    return statistics.median(times["engine"]) - statistics.median(times["bare"])


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = make_batches(args)
    figures = {
        "workload": {
            "model": args.model,
            "size": args.size,
            "batch_size": args.batch_size,
            "iters": args.iters,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "machine": common.machine(args.device),
        "precision": {},
    }
    for precision in args.precision:
        train_flags = train_args(args, amp=precision == "amp")
        model = train.get_model(train_flags, num_classes=91).to(args.device)
        initial = copy.deepcopy(model.state_dict())
        runs = {mode: [] for mode in MODES}
        timed_run("bare", model, initial, batches, args, train_flags)  # warms caches up
        for repeat in range(args.repeats):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                runs[mode].append(timed_run(mode, model, initial, batches, args, train_flags))
        result = {
            mode: {
                "iters_per_s": common.summary([1 / seconds for seconds, _ in runs[mode]]),
                "peak_memory_mib": common.summary([peak / 2**20 for _, peak in runs[mode]]),
            }
            for mode in MODES
        }
        engine_s = 1 / result["engine"]["iters_per_s"]["median"]
        bare_s = 1 / result["bare"]["iters_per_s"]["median"]
        result["engine_slower_by"] = engine_s / bare_s - 1
        overhead = stub_overhead(args, batches, train_flags)
        result["stub_overhead_ms"] = overhead * 1e3
        result["stub_overhead_share"] = overhead / bare_s
        figures["precision"][precision] = result
        del model, initial
    print_figures(figures)
    common.write_json(args.json, figures)


def print_figures(figures):
    workload, machine = figures["workload"], figures["machine"]
    print(
        f"{workload['model']}, {workload['size']} px, batch {workload['batch_size']}, "
        f"{machine['device']} ({machine['gpu'] or str(machine['threads']) + ' threads'}); "
        f"{workload['iters']} iterations after {workload['warmup']}, "
        f"median (min-max) of {workload['repeats']} runs"
    )
    print(
        f"{'precision':<10} {'bare it/s':>20} {'engine it/s':>20} {'engine slower':>14} "
        f"{'peak MiB':>9} {'stub overhead':>22}"
    )
    for precision, result in figures["precision"].items():
        cells = [
            f"{result[m]['iters_per_s']['median']:.3f} "
            f"({result[m]['iters_per_s']['min']:.3f}-{result[m]['iters_per_s']['max']:.3f})"
            for m in MODES
        ]
        print(
            f"{precision:<10} {cells[0]:>20} {cells[1]:>20} "
            f"{100 * result['engine_slower_by']:>13.1f}% "
            f"{result['engine']['peak_memory_mib']['median']:>9.0f} "
            f"{result['stub_overhead_ms']:>7.2f} ms ({100 * result['stub_overhead_share']:.2f}%)"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())

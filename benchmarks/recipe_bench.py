"""What a training recipe costs: seconds per training step of several recipes measured side by
side, and the compute of each whole run (its steps x seconds per step) relative to the first's.

    python datasets/make_demo.py --output datasets/demo
    python benchmarks/recipe_bench.py --data-path datasets/demo \\
        --recipe "demo=--config configs/demo.toml" \\
        --recipe "half=--config configs/demo.toml --epochs 4" --json recipe_bench.json

A recipe is NAME=FLAGS: train.py's flags (a --config file and what overrides it). Each builds its
model, optimizer and batches from train.py's own functions, on --data-path's training images
through the recipe's augmentation; batches are made once and held in memory, so data loading
is not timed, and evaluation is not counted. `--amp` recipes run under train.py's autocast
(bfloat16 on the CPU, also where train.py would fall back to float32). The learning rate is set
to 0: the weights stay as they start (a model from scratch at full rate without its warmup can
blow up into values that make the arithmetic itself slower), while every step still computes
and applies its update. They start as initialised, or from a recipe's `--weights FILE`: a
trained checkpoint gives the RPN proposals, and so the RoIs that reach the heads, of a trained
model. A run is --steps steps after one untimed step; runs of the recipes alternate, their order
rotated from repeat to repeat, so all of them see the same load. Figures are medians over the
repeats. A run's compute is its epochs x steps per epoch (batches of the training set) x seconds
per step: load-independent as a ratio, not as seconds.
"""

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import engine  # noqa: E402
import models  # noqa: E402
import recipes  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default="datasets/demo", help="COCO-layout dataset root")
    parser.add_argument(
        "--recipe", action="append", required=True, help="NAME=FLAGS (train.py flags); repeat"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each recipe")
    parser.add_argument("--json", help="write the figures to this JSON file")
    return parser


class Recipe:
    """One recipe's model, optimizer and batches, ready to take training steps."""

    def __init__(self, name, flags, data_path, batches):
        self.name = name
        self.args = recipes.parse_args(
            train.get_args_parser(), [*shlex.split(flags), "--data-path", data_path]
        )
        dataset = train.get_dataset(self.args, "train")
        self.steps_per_epoch = -(-len(dataset) // self.args.batch_size)
        torch.manual_seed(0)
        self.model = models.get_model(self.args, train.default_num_classes(dataset)).train()
        self.optimizer = train.get_optimizer(self.args, self.model)
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        size = self.args.batch_size
        samples = [dataset[i % len(dataset)] for i in range(batches * size)]
        self.batches = [
            utils.collate_fn(samples[i : i + size]) for i in range(0, len(samples), size)
        ]

    @property
    def run_steps(self):
        return self.args.epochs * self.steps_per_epoch

    def step(self, images, targets):
        images = engine.images_to_device(images, "cpu")
        with engine.autocast("cpu", self.args.amp):
            losses = self.model(images, list(targets))
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        if self.args.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad_norm)
        self.optimizer.step()

    def seconds_per_step(self):
        """Median seconds of the timed steps, after one untimed step."""
        self.step(*self.batches[0])
        times = []
        for images, targets in self.batches[1:]:
            start = time.perf_counter()
            self.step(images, targets)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def main(args):
    recipes_ = [Recipe(*parse_recipe(r), args.data_path, args.steps + 1) for r in args.recipe]
    times = {recipe.name: [] for recipe in recipes_}
    for repeat in range(args.repeats):
        shift = repeat % len(recipes_)
        for recipe in recipes_[shift:] + recipes_[:shift]:
            times[recipe.name].append(recipe.seconds_per_step())
    figures = {"machine": common.machine("cpu"), "args": vars(args), "recipes": {}}
    base = recipes_[0]
    base_step = statistics.median(times[base.name])
    for recipe in recipes_:
        step = statistics.median(times[recipe.name])
        figures["recipes"][recipe.name] = {
            "flags": dict(parse_recipe(r) for r in args.recipe)[recipe.name],
            "batch_size": recipe.args.batch_size,
            "seconds_per_step": step,
            "step_cost": step / base_step,
            "run_steps": recipe.run_steps,
            "run_compute": step * recipe.run_steps / (base_step * base.run_steps),
        }
    print_table(figures["recipes"])
    common.write_json(args.json, figures)
    return figures


def parse_recipe(text):
    name, _, flags = text.partition("=")
    if not name or not flags:
        raise SystemExit(f"--recipe {text!r}: expected NAME=FLAGS")
    return name, flags


def print_table(rows):
    print("| recipe | images per step | s per step | step cost | steps | run compute |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(
            f"| {name} | {row['batch_size']} | {row['seconds_per_step']:.2f} | "
            f"{row['step_cost']:.2f}x | {row['run_steps']} | {row['run_compute']:.2f}x |"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())

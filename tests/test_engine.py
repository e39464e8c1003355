"""The loops of engine.py on a stub model: scheduling, stop flags, non-finite losses, evaluation."""

import argparse
import platform
from pathlib import Path

import pytest
import torch
from conftest import make_sample

from engine import (
    NonFiniteLossError,
    cpu_emulates_bfloat16,
    evaluate,
    images_to_device,
    train_one_epoch,
)


class LinearLossModel(torch.nn.Module):
    """Training: one loss per image set, from a single weight; inference: one fixed detection."""

    def __init__(self, poison_at=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(1.0))
        self.poison_at = poison_at
        self.calls = 0

    def forward(self, images, targets=None):
        if self.training:
            self.calls += 1
            loss = self.weight * sum(image.mean() for image in images)
            if self.calls == self.poison_at:
                loss = loss * float("nan")
            return {"loss_a": loss, "loss_b": loss * 0.5}
        height, width = images[0].shape[-2:]
        masks = torch.zeros(1, 1, height, width, dtype=torch.bfloat16)
        masks[..., :4, :4] = 1
        return [
            {
                "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=torch.bfloat16),
                "labels": torch.tensor([1]),
                "scores": torch.tensor([0.9], dtype=torch.bfloat16),
                "masks": masks,
            }
            for _ in images
        ]


def batches(count):
    image, target = make_sample()
    return [((image, image), (target, target)) for _ in range(count)]


def loop_args(**overrides):
    return argparse.Namespace(
        **{"print_freq": 1, "amp": False, "clip_grad_norm": None, **overrides}
    )


def optimizer_and_schedule(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return optimizer, schedule


def test_images_become_float_on_the_device():
    image, _ = make_sample()
    as_float = torch.rand(3, 8, 8)  # a 16-bit image, already scaled
    moved = images_to_device([image, as_float], "cpu")
    assert moved[0].dtype == torch.float32 and torch.allclose(moved[0] * 255, image.float())
    assert moved[1] is as_float


def test_one_epoch_steps_the_schedule_every_iteration_and_averages_losses():
    model = LinearLossModel()
    optimizer, schedule = optimizer_and_schedule(model)
    stats = train_one_epoch(model, optimizer, schedule, batches(3), "cpu", 0, loop_args())
    assert schedule.last_epoch == 3
    assert set(stats) == {"loss", "loss_a", "loss_b"}
    assert stats["loss_b"] == pytest.approx(stats["loss_a"] / 2)
    assert model.weight.item() < 1.0  # the optimizer stepped


def test_after_step_sees_iterations_from_the_resumed_start_and_the_stop_flag():
    model = LinearLossModel()
    optimizer, schedule = optimizer_and_schedule(model)
    seen = []
    train_one_epoch(
        model, optimizer, schedule, batches(3), "cpu", 0, loop_args(), start_iteration=5,
        stop_flag=lambda: len(seen) == 1, after_step=lambda done, stop: seen.append((done, stop)),
    )  # fmt: skip
    assert seen == [(6, False), (7, True), (8, False)]


def test_non_finite_loss_names_epoch_iteration_and_losses():
    model = LinearLossModel(poison_at=2)
    optimizer, schedule = optimizer_and_schedule(model)
    with pytest.raises(NonFiniteLossError) as error:
        train_one_epoch(model, optimizer, schedule, batches(3), "cpu", 4, loop_args())
    assert error.value.message == "non-finite loss at epoch 4, iteration 1: loss_a=nan, loss_b=nan"


def test_clipping_bounds_the_gradient_norm():
    model = LinearLossModel()
    optimizer, schedule = optimizer_and_schedule(model)
    args = loop_args(clip_grad_norm=1e-3)
    train_one_epoch(model, optimizer, schedule, batches(1), "cpu", 0, args)
    assert model.weight.grad.abs().item() == pytest.approx(1e-3)  # the gradient stepped with


class RecordingEvaluator:
    def __init__(self):
        self.updates = {}

    def update(self, predictions):
        self.updates.update(predictions)

    def synchronize_between_processes(self):
        pass

    def evaluate(self):
        return {"bbox": [len(self.updates)]}


def test_evaluate_gives_float32_outputs_and_per_image_metrics_by_image_id():
    model = LinearLossModel()
    image, target = make_sample()
    other = {**target, "image_id": 8, "masks": torch.zeros_like(target["masks"][:1])}
    data = [((image,), (target,)), ((image,), (other,))]
    evaluator = RecordingEvaluator()
    metrics = {"objects": lambda target, output: (len(target["masks"]), len(output["masks"]))}
    stats = evaluate(model, data, "cpu", evaluator, image_metrics=metrics)
    assert set(evaluator.updates) == {7, 8} and stats["bbox"] == [2]
    assert all(o["masks"].dtype == torch.float32 for o in evaluator.updates.values())
    assert stats["objects"] == {7: (3, 1), 8: (1, 1)}


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads /proc/cpuinfo"
)
def test_bfloat16_emulation_is_told_from_the_cpus_flags():
    flags = next(
        line.split(":", 1)[1].split()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
    )
    native = bool({"avx512_bf16", "amx_tile"} & set(flags))
    assert cpu_emulates_bfloat16() is not native

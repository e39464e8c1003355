"""tensorboard_log: what is written reads back, with TensorBoard's own reader, as it was given."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

import tensorboard_log
from coco_eval import STAT_NAMES
from overlays import draw_instances


def read_events(log_dir):
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag):
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def f32(value):
    return float(np.float32(value))  # TensorBoard stores scalars as float32


LOSSES = [
    {"loss": 2.5, "loss_classifier": torch.tensor(0.75), "loss_mask": 1.75},
    {"loss": 1.25, "loss_classifier": torch.tensor(0.5), "loss_mask": 0.125},
    {"loss": float("inf"), "loss_classifier": torch.tensor(0.1), "loss_mask": 0.3},
]
LRS = [1e-5, 3.3e-4, 5e-4]
EVALUATIONS = [
    {"bbox": [0.1 * (k + 1) for k in range(12)], "segm": [0.2] * 3 + [-1.0] + [0.3] * 8},
    {"bbox": [0.05] * 12},
    {"bbox": [0.2] * 12, "segm": [0.25] * 12, "dsb": 0.61},
]


@pytest.fixture
def written(tmp_path):
    writer = tensorboard_log.make_writer(str(tmp_path))
    for step, (losses, lr) in enumerate(zip(LOSSES, LRS, strict=True), start=40):
        tensorboard_log.log_step(writer, step, losses, lr)
    for epoch, stats in enumerate(EVALUATIONS):
        tensorboard_log.log_evaluation(writer, epoch, stats)
    writer.close()
    return read_events(tmp_path / "tensorboard")


def test_step_scalars_read_back(written):
    for name in ("loss", "loss_classifier", "loss_mask"):
        expected = [(40 + k, f32(losses[name])) for k, losses in enumerate(LOSSES)]
        assert scalars(written, f"train/{name}") == expected
    assert scalars(written, "train/lr") == [(40 + k, f32(lr)) for k, lr in enumerate(LRS)]


def test_evaluation_scalars_read_back_by_name(written):
    for k, name in enumerate(STAT_NAMES):
        expected = [(epoch, f32(stats["bbox"][k])) for epoch, stats in enumerate(EVALUATIONS)]
        assert scalars(written, f"bbox/{name}") == expected
    assert scalars(written, "segm/AP") == [(0, f32(0.2)), (2, f32(0.25))]
    assert scalars(written, "segm/APs") == [(2, f32(0.25))]  # -1 at epoch 0 is left out
    assert scalars(written, "dsb/score") == [(2, f32(0.61))]


def test_no_other_tags(written):
    expected = {"train/loss", "train/loss_classifier", "train/loss_mask", "train/lr", "dsb/score"}
    expected |= {f"{t}/{name}" for t in ("bbox", "segm") for name in STAT_NAMES}
    assert set(written.Tags()["scalars"]) == expected


def sample(height=24, width=30):
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, height, width), dtype=torch.uint8, generator=generator)
    gt = torch.zeros(2, height, width, dtype=torch.uint8)
    gt[0, 2:10, 3:12] = 1
    gt[1, 14:22, 15:28] = 1
    probabilities = torch.zeros(3, 1, height, width)
    probabilities[0, 0, 2:10, 3:12] = 0.9
    probabilities[0, 0, 10:12, 3:12] = 0.4  # below the mask threshold: not drawn
    probabilities[1, 0, 14:20, 15:25] = 0.8
    probabilities[2, 0, 0:5, 20:30] = 0.95  # a detection with a low score: not drawn
    output = {"masks": probabilities, "scores": torch.tensor([0.9, 0.6, 0.3])}
    output["boxes"] = torch.tensor([[3.0, 2, 12, 10], [15, 14, 25, 20], [20, 0, 30, 5]])
    return image, {"masks": gt}, output


def read_image(accumulator, tag):
    events = accumulator.Images(tag)
    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in events]


def test_predictions_show_truth_beside_kept_masks(tmp_path):
    image, target, output = sample()
    float_image = image.float() / 255
    writer = tensorboard_log.make_writer(str(tmp_path))
    tensorboard_log.log_predictions(writer, 3, [image], [target], [output])
    tensorboard_log.log_predictions(writer, 4, [image, float_image], [target] * 2, [output] * 2)
    writer.close()
    accumulator = read_events(tmp_path / "tensorboard")
    truth = draw_instances(image, target["masks"].bool(), text="off")
    kept = output["masks"][:2, 0] > 0.5
    prediction = draw_instances(image, kept, text="off")
    gap = np.full((truth.shape[0], tensorboard_log.GAP, 3), 255, dtype=np.uint8)
    expected = np.concatenate([truth, gap, prediction], axis=1)
    steps = read_image(accumulator, "predictions/0")
    assert [step for step, _ in steps] == [3, 4]
    assert all(np.array_equal(pixels, expected) for _, pixels in steps)
    ((_, from_float),) = read_image(accumulator, "predictions/1")
    assert np.array_equal(from_float, expected)
    every_mask = draw_instances(image, output["masks"][:, 0] > 0.3, text="off")
    assert not np.array_equal(prediction, every_mask)


def test_predictions_of_a_box_model_draw_boxes():
    image, target, output = sample()
    del output["masks"]
    drawn = tensorboard_log.side_by_side(image, target, output)
    right = drawn[:, drawn.shape[1] // 2 + tensorboard_log.GAP // 2 :]
    untouched = draw_instances(image, torch.zeros(0, *image.shape[1:], dtype=torch.bool))
    assert right.shape == untouched.shape and not np.array_equal(right, untouched)


class RecordingModel(torch.nn.Module):
    def __init__(self, output):
        super().__init__()
        self.output = output
        self.modes, self.inputs = [], []

    def forward(self, images):
        self.modes.append(self.training)
        self.inputs.append(images)
        return [self.output for _ in images]


def test_predict_samples_runs_in_eval_mode_and_restores_training():
    image, target, output = sample()
    model = RecordingModel(output).train()
    dataset = [(image, target), (image.flip(-1), target), (image, target)]
    images, targets, outputs = tensorboard_log.predict_samples(model, dataset, [1, 2], "cpu")
    assert model.modes == [False] and model.training
    assert torch.equal(images[0], image.flip(-1)) and len(targets) == len(outputs) == 2
    (inputs,) = model.inputs
    assert inputs[0].dtype == torch.float32 and inputs[0].max() <= 1.0
    assert torch.equal(outputs[0]["scores"], output["scores"])


def accumulated_eval(precision):
    params = SimpleNamespace(
        iouThrs=np.linspace(0.5, 0.95, 10),
        recThrs=np.linspace(0, 1, 101),
        areaRngLbl=["all", "small", "medium", "large"],
        catIds=[1, 2, 7],
    )
    return SimpleNamespace(params=params, eval={"precision": precision})


def test_pr_curves_read_back_per_category(tmp_path):
    rng = np.random.default_rng(0)
    precision = rng.random((10, 101, 3, 4, 3))
    precision[:, :, 1] = -1  # category 2 has no ground truth
    writer = tensorboard_log.make_writer(str(tmp_path))
    names = {1: "cell", 2: "debris", 7: "blob"}
    tensorboard_log.log_pr_curves(writer, 5, {"segm": accumulated_eval(precision)}, names)
    writer.close()
    accumulator = read_events(tmp_path / "tensorboard")
    assert set(accumulator.Tags()["tensors"]) == {
        "pr_segm_iou0.50/cell",
        "pr_segm_iou0.50:0.95/cell",
        "pr_segm_iou0.50/blob",
        "pr_segm_iou0.50:0.95/blob",
    }
    for k, name in ((0, "cell"), (2, "blob")):
        for tag, curve in (
            (f"pr_segm_iou0.50/{name}", precision[0, :, k, 0, -1]),
            (f"pr_segm_iou0.50:0.95/{name}", precision[:, :, k, 0, -1].mean(axis=0)),
        ):
            (event,) = accumulator.Tensors(tag)
            data = make_ndarray(event.tensor_proto)
            assert event.step == 5 and data.shape == (6, 101)
            assert np.array_equal(data[4], curve.astype(np.float32))
            assert np.array_equal(data[5], np.linspace(0, 1, 101).astype(np.float32))

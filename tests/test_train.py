"""End-to-end runs of train.main on the 64 px demo dataset (a few iterations each)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FAST, ROOT, SMALL_MASKRCNN
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import loading
import models
import recipes
import train
from coco_eval import STAT_NAMES
from engine import NonFiniteLossError


def run_main(data_root, output_dir, *extra, model=SMALL_MASKRCNN):
    args = train.get_args_parser().parse_args(
        ["--data-path", str(data_root), "--output-dir", str(output_dir), *model, *FAST, *extra]
    )
    train.main(args)
    return args


def read_log(output_dir):
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def trained(maskrcnn_checkpoint):
    return maskrcnn_checkpoint.parent


@pytest.mark.slow
def test_training_writes_checkpoints_loadable_with_weights_only(trained):
    for name in ("model_0.pth", "model_1.pth", "checkpoint.pth"):
        checkpoint = torch.load(trained / name, weights_only=True)
        assert {"model", "optimizer", "lr_scheduler", "epoch", "args"} <= checkpoint.keys()
    assert torch.load(trained / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not list(trained.glob(".*.tmp"))


@pytest.mark.slow
def test_training_logs_one_json_line_per_epoch(trained):
    records = read_log(trained)
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        assert len(record["bbox"]) == len(record["segm"]) == 12
        assert {"loss", "loss_mask", "loss_classifier"} <= record["train"].keys()
        assert all(v == v and abs(v) < 1e6 for v in record["train"].values())
    assert records[1]["train"]["loss"] < records[0]["train"]["loss"]


@pytest.mark.slow
def test_tensorboard_scalars_equal_the_log(trained):
    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    records = read_log(trained)
    for iou_type in ("bbox", "segm"):
        logged = [e.value for e in events.Scalars(f"{iou_type}/AP")]
        assert logged == pytest.approx([r[iou_type][0] for r in records], abs=1e-6)
    losses = [e.value for e in events.Scalars("train/loss")]
    steps = len(losses) // len(records)
    for epoch, record in enumerate(records):
        average = sum(losses[epoch * steps : (epoch + 1) * steps]) / steps
        assert average == pytest.approx(record["train"]["loss"], rel=1e-5)
    assert "predictions/0" in events.Tags()["images"]


@pytest.mark.slow
def test_best_checkpoint_is_the_epoch_with_the_highest_segm_ap(trained):
    records = read_log(trained)
    best = max(records, key=lambda r: r["segm"][0])
    assert records[-1]["best"] == {
        "metric": "segm/AP",
        "epoch": best["epoch"],
        "value": best["segm"][0],
    }
    saved = torch.load(trained / "model_best.pth", weights_only=True)
    assert saved["epoch"] == best["epoch"]


@pytest.mark.slow
def test_config_toml_repeats_the_run(trained):
    parser = train.get_args_parser()
    repeated = recipes.parse_args(parser, ["--config", str(trained / "config.toml")])
    saved = torch.load(trained / "checkpoint.pth", weights_only=True)["args"]
    for name, value in vars(repeated).items():
        if name not in recipes.NOT_RECORDED and name in saved:
            assert value == saved[name], name


@pytest.mark.slow
def test_patience_stops_a_run_that_no_longer_improves(demo_root, tmp_path, monkeypatch, capsys):
    scores = iter([0.2, 0.3, 0.25, 0.1])

    def evaluation(*args, **kwargs):
        return {"segm": [next(scores)] + [0.0] * 11}

    monkeypatch.setattr(train, "evaluate_and_report", evaluation)
    run_main(demo_root, tmp_path, "--epochs", "4", "--patience", "1", "--keep-last", "1")
    records = read_log(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["best"] == {"metric": "segm/AP", "epoch": 1, "value": 0.3}
    assert "early stop: segm/AP has not improved for 1 evaluations" in capsys.readouterr().out
    assert torch.load(tmp_path / "model_best.pth", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "model_1.pth").exists()  # --keep-last leaves model_best.pth alone


def test_evaluation_every_n_epochs_and_at_the_last():
    args = train.get_args_parser().parse_args(["--epochs", "5", "--eval-every", "2"])
    assert [train.evaluates_at(args, epoch) for epoch in range(5)] == [0, 1, 0, 1, 1]


@pytest.mark.slow
def test_test_only_reproduces_the_epoch_evaluation(demo_root, trained, tmp_path):
    run_main(demo_root, tmp_path, "--test-only", "--resume", str(trained / "checkpoint.pth"))
    result = json.loads((tmp_path / "eval.json").read_text())
    last_epoch = read_log(trained)[-1]
    assert result["epoch"] == 1
    assert result["bbox"] == last_epoch["bbox"]
    assert result["segm"] == last_epoch["segm"]


@pytest.mark.parametrize(
    ("name", "valid"),
    [("dsb", True), ("nuclei/pq", True), ("nuclei/aji", True), ("nuclei/f1", False)],
)
def test_best_metric_names(name, valid):
    assert train.valid_metric_name(name) is valid


@pytest.mark.slow
def test_nuclei_metrics_overall_per_kind_and_per_image(demo_root, trained, tmp_path, capsys):
    ann = demo_root / "annotations" / "instances_val2017.json"
    dataset = json.loads(ann.read_text())
    for image, kind in zip(dataset["images"], ["tissue", "fluorescence", "tissue"], strict=True):
        image["kind"] = kind
    (tmp_path / "val.json").write_text(json.dumps(dataset))
    checkpoint = str(trained / "checkpoint.pth")
    data = ["--val-ann", str(tmp_path / "val.json"), "--val-images", str(demo_root / "val2017")]
    run_main(demo_root, tmp_path, "--test-only", "--resume", checkpoint, "--nuclei-metrics", *data)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert list(result["nuclei"]) == ["all", "tissue", "fluorescence"]
    assert [result["nuclei"][kind]["images"] for kind in ("all", "tissue")] == [3, 2]
    assert result["dsb"] == result["nuclei"]["all"]["dsb"]
    rows = (tmp_path / "nuclei.csv").read_text().splitlines()
    assert rows[0].startswith("image,kind,gt,pred,tp_iou50,dsb,f1_iou50,") and len(rows) == 4
    assert "Nuclei measures" in capsys.readouterr().out
    assert train.metric_value(result, "nuclei/pq") == result["nuclei"]["all"]["pq"]


@pytest.mark.slow
def test_results_files_reproduce_the_logged_stats_with_pycocotools(demo_root, trained):
    coco_gt = COCO(str(demo_root / "annotations" / "instances_val2017.json"))
    last_epoch = read_log(trained)[-1]
    for iou_type in ("bbox", "segm"):
        results = json.loads((trained / f"results_{iou_type}.json").read_text())
        assert results and all(isinstance(r["image_id"], int) for r in results)
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        coco_eval.params.imgIds = sorted(coco_gt.getImgIds())
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        assert coco_eval.stats.tolist() == pytest.approx(last_epoch[iou_type], abs=1e-12)


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch(demo_root, trained, tmp_path):
    shutil.copy(trained / "model_0.pth", tmp_path / "start.pth")
    run_main(demo_root, tmp_path, "--epochs", "2", "--resume", str(tmp_path / "start.pth"))
    assert [r["epoch"] for r in read_log(tmp_path)] == [1]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_resume_restores_optimizer_and_scheduler(demo_root, trained):
    checkpoint = torch.load(trained / "model_0.pth", weights_only=True)
    args = train.get_args_parser().parse_args([*SMALL_MASKRCNN, *FAST, "--epochs", "2"])
    model = models.get_model(args, checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])
    optimizer = train.get_optimizer(args, model)
    scheduler = train.get_lr_scheduler(args, optimizer, checkpoint["iters_per_epoch"])
    start = train.resume_training_state(
        checkpoint, optimizer, scheduler, None, checkpoint["iters_per_epoch"]
    )
    assert start == (1, 0)
    saved = checkpoint["optimizer"]["state"]
    restored = optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() and len(saved) > 0
    for key in saved:
        assert torch.equal(saved[key]["momentum_buffer"], restored[key]["momentum_buffer"])
    assert scheduler.state_dict()["last_epoch"] == checkpoint["lr_scheduler"]["last_epoch"]
    assert optimizer.param_groups[0]["lr"] == checkpoint["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.parametrize(("warmup_iters", "expected"), [(None, 9), (3, 3)])
def test_warmup_rises_linearly_to_the_lr_over_its_iterations(warmup_iters, expected):
    args = train.get_args_parser().parse_args(["--lr", "0.1", "--epochs", "2"])
    args.warmup_iters = warmup_iters
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = train.get_lr_scheduler(args, optimizer, iters_per_epoch=10)
    rates = []
    for _ in range(expected + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(rates[:expected], rates[1:], strict=False))
    assert rates[expected] == pytest.approx(0.1)


@pytest.mark.slow
def test_amp_trains_on_cpu_with_bfloat16(demo_root, tmp_path):
    # --force-amp: bfloat16 also where CI's CPU would only emulate it.
    run_main(demo_root, tmp_path, "--epochs", "1", "--amp", "--force-amp")
    (record,) = read_log(tmp_path)
    assert all(torch.isfinite(torch.tensor(v)) for v in record["train"].values())
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["args"]["amp"] is True


@pytest.mark.parametrize(
    ("device", "emulated", "extra", "amp", "notice"),
    [
        ("cpu", True, [], False, True),
        ("cpu", True, ["--force-amp"], True, False),
        ("cpu", False, [], True, False),
        ("cuda", True, [], True, False),
    ],
)
def test_amp_runs_float32_only_on_a_cpu_that_emulates_bfloat16(
    monkeypatch, capsys, device, emulated, extra, amp, notice
):
    monkeypatch.setattr(train, "cpu_emulates_bfloat16", lambda: emulated)
    args = train.get_args_parser().parse_args(["--device", device, "--amp", *extra])
    train.choose_precision(args)
    assert args.amp is amp
    assert ("training in float32 (--force-amp insists" in capsys.readouterr().out) is notice


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_earlier_checkpoint(demo_root, tmp_path, monkeypatch):
    build = models.get_model

    def model_with_nan_after_first_epoch(args, num_classes):
        model = build(args, num_classes)
        forward = model.forward
        calls = []

        def poisoned_forward(images, targets=None):
            output = forward(images, targets)
            if model.training:
                calls.append(1)
                if len(calls) > 2:  # two iterations per epoch
                    return {k: v * float("nan") for k, v in output.items()}
            return output

        model.forward = poisoned_forward
        return model

    monkeypatch.setattr(models, "get_model", model_with_nan_after_first_epoch)
    with pytest.raises(NonFiniteLossError) as error:
        run_main(demo_root, tmp_path, "--epochs", "3")
    message = error.value.message
    assert "non-finite loss at epoch 1, iteration 0" in message and "loss_mask=nan" in message
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 0


@pytest.mark.slow
def test_fine_tuning_from_a_checkpoint_with_other_class_count(demo_root, trained, tmp_path, capsys):
    run_main(
        demo_root,
        tmp_path,
        "--epochs", "1", "--num-classes", "5", "--weights", str(trained / "checkpoint.pth"),
    )  # fmt: skip
    assert (
        "re-initialised (class count differs): roi_heads.box_predictor" in capsys.readouterr().out
    )
    model = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert model["roi_heads.box_predictor.cls_score.weight"].shape[0] == 5


def run_cli(*argv):
    return subprocess.run(
        [sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--data-path", "/nonexistent/coco"], "--data-path /nonexistent/coco: no such folder"),
        (["--use-copypaste"], "--use-copypaste works only with --data-augmentation lsj"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--force-amp"], "--force-amp works only with --amp"),
    ],
)
def test_bad_input_gives_one_line_error(argv, expected):
    result = run_cli("--device", "cpu", *argv)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_model_flags_reach_the_torchvision_model():
    args = train.get_args_parser().parse_args(
        "--box-score-thresh 0 --box-nms-thresh 0.6 --box-batch-size-per-image 32 "
        "--rpn-post-nms-top-n-test 300 --box-detections-per-img 400 "
        "--anchor-sizes 8 16 32 64 128 --box-positive-fraction 0.5".split()
    )
    model = models.get_model(args, 3)
    heads = model.roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.0, 0.6, 400)
    assert heads.fg_bg_sampler.batch_size_per_image == 32
    assert heads.fg_bg_sampler.positive_fraction == 0.5
    assert model.rpn._post_nms_top_n["testing"] == 300
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))


@pytest.mark.slow
def test_unet_trains_through_the_same_loop_and_test_only_reproduces_it(
    demo_root, unet_checkpoint, tmp_path
):
    run_dir = unet_checkpoint.parent
    records = read_log(run_dir)
    assert [r["epoch"] for r in records] == list(range(6))
    assert {"loss_foreground", "loss_border", "loss_classifier"} <= records[0]["train"].keys()
    assert records[-1]["train"]["loss"] < records[0]["train"]["loss"]
    assert "segm" not in records[0] and len(records[-1]["segm"]) == 12  # --eval-every 6
    unet = ["--model", "unet_resnet18"]
    run_main(demo_root, tmp_path, "--test-only", "--resume", str(unet_checkpoint), model=unet)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["bbox"] == records[-1]["bbox"] and result["segm"] == records[-1]["segm"]


@pytest.mark.slow
def test_unet_resumes_at_the_next_epoch(demo_root, unet_checkpoint, tmp_path):
    shutil.copy(unet_checkpoint.parent / "model_4.pth", tmp_path / "start.pth")
    run_main(
        demo_root, tmp_path, "--epochs", "6", "--opt", "adamw", "--lr", "0.003",
        "--resume", str(tmp_path / "start.pth"), model=["--model", "unet_resnet18"],
    )  # fmt: skip
    (record,) = read_log(tmp_path)
    assert record["epoch"] == 5
    assert record["train"] == pytest.approx(read_log(unet_checkpoint.parent)[-1]["train"])


def dsb_recipe_args(name, dsb_root, output_dir, *extra):
    root = str(dsb_root)
    argv = ["--config", f"{ROOT}/configs/{name}", "--output-dir", str(output_dir)]
    for split in ("train", "val"):
        argv += [f"--{split}-ann", f"{root}/annotations/instances_{split}.json"]
        argv += [f"--{split}-images", f"{root}/{split}"]
    return recipes.parse_args(train.get_args_parser(), [*argv, *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dsb2018_maskrcnn.toml", "dsb2018_unet.toml"])
def test_dsb2018_recipes_train_on_crops_and_evaluate_whole_images(name, dsb_root, tmp_path):
    args = dsb_recipe_args(
        name, dsb_root, tmp_path, "--epochs", "1", "--crop-size", "64", "--workers", "0",
        "--rpn-post-nms-top-n-train", "100", "--box-batch-size-per-image", "32",
    )  # fmt: skip
    train.main(args)
    (record,) = read_log(tmp_path)
    assert record["train"]["loss"] > 0 and len(record["segm"]) == 12
    assert {"dsb", "errors"} <= record.keys()
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["args"]["image_scale"] == 1.0
    model = loading.load(str(tmp_path / "checkpoint.pth")).model
    # Whole validation images at their own size, as the checkpoint says, whatever the crops were.
    assert model.transform([torch.rand(3, 96, 96)])[0].image_sizes == [(96, 96)]


def test_the_dsb2018_detection_cap_reaches_the_model_and_the_evaluator(dsb_root, tmp_path):
    args = dsb_recipe_args("dsb2018_maskrcnn.toml", dsb_root, tmp_path)
    model = models.get_model(args, 2)
    assert model.roi_heads.detections_per_img == 500
    assert model.rpn._post_nms_top_n["testing"] >= 500
    dataset = train.get_dataset(args, "val")
    evaluator = train.make_evaluator(args, model, dataset, 2)
    assert evaluator.max_dets[-1] == 500
    # 120 confident false detections in a corner free of nuclei, then every nucleus: a cap of
    # 100 would count none of the nuclei.
    _, target = dataset[0]
    truth = target["masks"].float()
    junk = torch.zeros(120, *truth.shape[-2:])
    junk[:, :2, :2] = 1
    masks = torch.cat([junk, truth])
    count = len(masks)
    output = {
        "boxes": torch.cat([torch.tensor([[0.0, 0.0, 2.0, 2.0]]).repeat(120, 1), target["boxes"]]),
        "labels": torch.ones(count, dtype=torch.int64),
        "scores": torch.cat([torch.full((120,), 0.9), torch.full((len(truth),), 0.5)]),
        "masks": masks[:, None],
    }
    evaluator.update({target["image_id"]: output})
    recall = evaluator.evaluate()["segm"][STAT_NAMES.index("AR100")]
    assert len(truth) > 0 and recall == 1.0

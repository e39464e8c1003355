r"""predict.py's Mask R-CNN path against a plain torchvision eval loop: images per second on the
same images and checkpoint, and whether both give the same instances.

    python benchmarks/predict_bench.py --json predict_bench.json
    python benchmarks/predict_bench.py --breakdown --allocator   # where the time goes
    python benchmarks/predict_bench.py --onnx model.onnx         # also an ONNX file

The plain loop is what a user writes: `model([image])[0]` in eval mode, torchvision pasting every
mask at the image's full size, masks above 0.5 (of the detections scoring at least
--score-thresh). predict.py's path is `predict.predict_image`: the same modules, the masks of the
kept detections pasted box by box and encoded as RLE (mask_crops.py), freed memory kept by
malloc. Both get the same uint8 images, made float by torchvision's `to_dtype` as predict.py does.
With the default --score-thresh 0 every detection is kept, so both paste every mask.

Each method runs in a process of its own (the allocator setting is per process), which loads
the checkpoint and images and runs one image untimed. Then image by image, each image goes to
every method in turn, the order rotated from one image to the next, --repeats times over: both
sides of a comparison run seconds apart, under the same load. Figures are medians over the
repeats with (min-max): images per second of each pass, and the speed-up per image (the plain
loop's time on an image over the method's). The run fails unless predict.py's path gives the
plain loop's instances: equal boxes, labels and scores, and RLE equal to that of the plain
loop's binary masks.

--allocator adds the plain loop with freed memory kept and predict.py's path without (what each
change is worth); --breakdown adds each path run stage by stage (transform, backbone, RPN, box
head, mask head, paste, threshold or RLE), with the page faults of each stage. --onnx FILE times
the ONNX file on onnxruntime (exported.OnnxModel), exporting the checkpoint to FILE first when
there is no such file; its masks are compared, not required equal.

The checkpoint. No trained weights can be downloaded here, so it is an untrained, seeded
maskrcnn_resnet50_fpn (91 classes) made to behave like a trained one where it matters for speed:
its BatchNorm statistics are those of the benchmark images (the default ones blow the
activations up, so that boxes collapse), frozen as in a model fine-tuned from torchvision's COCO
weights, and classes 1-3 are favoured so that each image gets box_detections_per_img (100)
detections of all sizes, as a trained model gets on a busy image. It is written as train.py
writes checkpoints, with --images generated images (smooth backgrounds and ellipses, --size),
to $TMPDIR/maskrcnn_benchmarks/predict_bench/<model>_<images>x<height>x<width>; with the
defaults, run predict.py on them with

    D=$TMPDIR/maskrcnn_benchmarks/predict_bench/maskrcnn_resnet50_fpn_4x800x1066
    python predict.py --weights $D/checkpoint.pth --input $D/images --output out/

Memory: each process holds up to about 2.5 GB at 800 px, all of them at once (7 with
--allocator --breakdown --onnx).
"""

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import export  # noqa: E402
import exported  # noqa: E402
import loading  # noqa: E402
import mask_crops  # noqa: E402
import models  # noqa: E402
import predict  # noqa: E402
import rcnn_inference  # noqa: E402
from coco_utils import load_image  # noqa: E402
from mask_geometry import MASK_THRESHOLD, crop_to_rle, masks_to_rles  # noqa: E402

MODEL = "maskrcnn_resnet50_fpn"
NUM_CLASSES = 91
# Logit biases of classes 1-3: scores of 0.5-0.9, and more candidates than the model keeps.
CLASS_BIAS = (6.0, 5.5, 5.0)
CACHE = Path(tempfile.gettempdir()) / "maskrcnn_benchmarks" / "predict_bench"
METHODS = ("plain", "predict")
ALLOCATOR_METHODS = ("plain, memory kept", "predict, memory returned")
BREAKDOWN_METHODS = ("plain, by stage", "predict, by stage")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="generated images (4)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(800, 1066), help="image height and width (800 1066)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="passes of each method (3)")
    parser.add_argument(
        "--score-thresh",
        type=float,
        default=0.0,
        help="keep detections scoring at least this (0: all, every mask pasted)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--allocator", action="store_true", help="add the allocator variants")
    parser.add_argument("--breakdown", action="store_true", help="add the stage-by-stage runs")
    parser.add_argument("--onnx", help="ONNX file to time too (exported there if missing)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    return parser


def make_image(rng, height, width):
    """A smooth random background with 30 ellipses of random colours, uint8 RGB."""
    coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        radius = rng.uniform(10, min(height, width) / 4, 2)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x - radius[0], y - radius[1], x + radius[0], y + radius[1]], fill=colour)
    return image


def set_batch_norm_statistics(model, images):
    """BatchNorm running statistics averaged over the backbone's inputs from `images`."""
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.transform.eval()
    model.backbone.train()
    with torch.no_grad():
        for image in images:
            model.backbone(model.transform([image])[0].tensors)
    model.eval()


def make_data(folder, num_images, height, width, seed=0):
    """Writes `folder`/images/*.png and `folder`/checkpoint.pth (see the module docstring)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for k in range(num_images):
        path = folder / "images" / f"image{k}.png"
        make_image(rng, height, width).save(path)
        images.append(F.to_dtype(load_image(str(path)), torch.float32, scale=True))
    torch.manual_seed(seed)
    args = models.model_defaults()
    args.model, args.num_classes = MODEL, NUM_CLASSES
    model = models.get_model(args, NUM_CLASSES)
    set_batch_norm_statistics(model, images)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1 : 1 + len(CLASS_BIAS)] += torch.tensor(
            CLASS_BIAS
        )
    # Without num_batches_tracked, loading.load freezes the BatchNorm layers, as
    # torchvision's pretrained models (and every model fine-tuned from them) have them.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    checkpoint = {
        "model": state,
        "args": vars(args),
        "epoch": 0,
        "num_classes": NUM_CLASSES,
        "category_names": {i: f"class{i}" for i in range(1, NUM_CLASSES)},
        "label_offset": 0,
    }
    torch.save(checkpoint, folder / "checkpoint.tmp")
    (folder / "checkpoint.tmp").rename(folder / "checkpoint.pth")


def data_folder(num_images, height, width):
    """The folder of the benchmark's checkpoint and images, made on first use."""
    folder = CACHE / f"{MODEL}_{num_images}x{height}x{width}"
    if not (folder / "checkpoint.pth").is_file():
        print(f"writing the checkpoint and images to {folder}", file=sys.stderr)
        make_data(folder, num_images, height, width)
    return folder


def to_float(image):
    return F.to_dtype(image, torch.float32, scale=True)


def plain_loop(model, score_thresh):
    """What a user writes: the model's own output, masks above the threshold."""

    def run(image):
        output = model([to_float(image)])[0]
        keep = output["scores"] >= score_thresh
        detections = {k: v[keep] for k, v in output.items()}
        detections["masks"] = detections["masks"][:, 0] > MASK_THRESHOLD
        return detections

    return run


def predict_path(model, score_thresh):
    def run(image):
        return predict.predict_image(model, image, "cpu", score_thresh)

    return run


class Stages:
    """Seconds and minor page faults of consecutive stages, by name."""

    def __init__(self):
        self.times, self.faults = {}, {}
        self.last = (time.perf_counter(), minor_faults())

    def __call__(self, name):
        now = (time.perf_counter(), minor_faults())
        self.times[name] = self.times.get(name, 0.0) + now[0] - self.last[0]
        self.faults[name] = self.faults.get(name, 0) + now[1] - self.last[1]
        self.last = now


def staged(model, image, stages, crops, score_thresh):
    """Either path, stage by stage: torchvision's full-size paste and threshold, or
    mask_crops' crops and RLE (`crops`); returns detections as the paths do."""
    height, width = image.shape[-2:]
    batch, size = rcnn_inference.resize_and_pad(model.transform, to_float(image))
    stages("transform")
    features = rcnn_inference.backbone_features(model.backbone, batch)
    stages("backbone")
    proposals = rcnn_inference.rpn_proposals(model.rpn, batch, size, features)
    stages("rpn")
    heads = model.roi_heads
    boxes, scores, labels = rcnn_inference.box_detections(heads, features, proposals, size)
    keep = scores >= score_thresh
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    stages("box head")
    masks = rcnn_inference.mask_probabilities(heads, features, boxes, labels, size)
    stages("mask head")
    boxes = rcnn_inference.scale_boxes(boxes, size, (height, width))
    detections = {"boxes": boxes, "labels": labels, "scores": scores}
    if crops:
        pieces = mask_crops.paste_crops(masks, boxes, height, width)
        stages("paste")
        detections["masks"] = [crop_to_rle(c, top, left, height, width) for top, left, c in pieces]
        stages("threshold, RLE")
    else:
        pasted = paste_masks_in_image(masks, boxes, (height, width))
        stages("paste")
        detections["masks"] = pasted[:, 0] > MASK_THRESHOLD
        stages("threshold, RLE")
    return detections


def staged_loop(model, score_thresh, crops):
    def run(image):
        stages = Stages()
        detections = staged(model, image, stages, crops, score_thresh)
        run.stages.append({"seconds": stages.times, "faults": stages.faults})
        return detections

    run.stages = []
    return run


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def method_runner(method, model, args):
    """The per-image function that `method` times; sets the allocator as the method has it."""
    if method == "predict, memory returned":
        mask_crops.keep_freed_memory = lambda: None
    if method == "plain, memory kept":
        mask_crops.keep_freed_memory()
    if method in ("plain", "plain, memory kept"):
        return plain_loop(model, args.score_thresh)
    if method in ("predict", "predict, memory returned"):
        return predict_path(model, args.score_thresh)
    if method == "onnx":
        return plain_loop(exported.OnnxModel(args.onnx), args.score_thresh)
    if method == "predict, by stage":
        mask_crops.keep_freed_memory()
    return staged_loop(model, args.score_thresh, crops=method == "predict, by stage")


def comparable(detections):
    """Boxes, labels, scores (CPU tensors) and mask RLE counts (str) in descending score."""
    order = predict.kept_in_order(detections["scores"], detections["labels"], 0.0)
    masks = detections["masks"]
    rles = (
        [masks[i] for i in order.tolist()]
        if isinstance(masks, list)
        else masks_to_rles(masks[order][:, None])
    )
    return {
        "boxes": detections["boxes"][order].cpu(),
        "labels": detections["labels"][order].cpu(),
        "scores": detections["scores"][order].cpu(),
        "rles": [rle["counts"].decode("ascii") for rle in rles],
    }


def serve(connection, method, folder, args):
    """A worker process: loads the checkpoint and images, runs `method` once untimed, then runs
    it on each image index it receives, answering with the time, page faults and outputs."""
    if args.threads:
        torch.set_num_threads(args.threads)
    images = [load_image(str(path)) for path in sorted((folder / "images").glob("*.png"))]
    model = loading.load(str(folder / "checkpoint.pth")).model
    run = method_runner(method, model, args)
    with torch.inference_mode():
        run(images[0])
        connection.send(torch.get_num_threads())
        while (index := connection.recv()) is not None:
            start, start_faults = time.perf_counter(), minor_faults()
            detections = run(images[index])
            seconds = time.perf_counter() - start
            result = {"seconds": seconds, "faults": minor_faults() - start_faults}
            result["output"] = comparable(detections)
            result["stages"] = run.stages[-1] if hasattr(run, "stages") else None
            connection.send(result)


def start_workers(methods, folder, args):
    """{method: (process, connection)}, each process ready (its untimed image done)."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for method in methods:
        print(f"starting {method}", file=sys.stderr)
        ours, theirs = context.Pipe()
        process = context.Process(target=serve, args=(theirs, method, folder, args))
        process.start()
        workers[method] = (process, ours, ours.recv())
    return workers


def run_methods(methods, folder, args):
    """{method: [its pass over the images per repeat]}: image by image, each image goes to
    every method in turn, in an order rotated from one image to the next."""
    num_images = len(list((folder / "images").glob("*.png")))
    workers = start_workers(methods, folder, args)
    keys = ("seconds", "faults", "output", "stages")
    results = {m: [{k: [] for k in keys} for _ in range(args.repeats)] for m in methods}
    step = 0
    try:
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
            for index in range(num_images):
                shift = step % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    workers[method][1].send(index)
                    answer = workers[method][1].recv()
                    for key in keys:
                        results[method][repeat][key].append(answer[key])
                step += 1
    finally:
        for process, connection, _ in workers.values():
            connection.send(None)
            process.join()
    threads = {method: worker[2] for method, worker in workers.items()}
    return results, threads


def same_instances(first, second):
    """(instances, instances that differ) between two methods' outputs of the same images."""
    total = differ = 0
    for a, b in zip(first, second, strict=True):
        if len(a["scores"]) != len(b["scores"]):
            total += max(len(a["scores"]), len(b["scores"]))
            differ += max(len(a["scores"]), len(b["scores"]))
            continue
        same = (a["boxes"] == b["boxes"]).all(1) & (a["labels"] == b["labels"])
        same &= a["scores"] == b["scores"]
        same &= torch.tensor(
            [x == y for x, y in zip(a["rles"], b["rles"], strict=True)], dtype=torch.bool
        )
        total += len(same)
        differ += int((~same).sum())
    return total, differ


def onnx_agreement(plain, onnx, height, width):
    """How far the ONNX file's outputs are from the plain loop's: the largest box difference
    (pixels) and the mean IoU of the masks, instance by instance (same counts only)."""
    from pycocotools import mask as mask_util

    box_diff, ious = 0.0, []
    for a, b in zip(plain, onnx, strict=True):
        if len(a["scores"]) != len(b["scores"]):
            return {"same_counts": False}
        if len(a["scores"]):
            box_diff = max(box_diff, float((a["boxes"] - b["boxes"]).abs().max()))
        for x, y in zip(a["rles"], b["rles"], strict=True):
            rles = [{"size": [height, width], "counts": c.encode("ascii")} for c in (x, y)]
            ious.append(float(mask_util.iou([rles[0]], [rles[1]], [0])[0, 0]))
    return {"same_counts": True, "max_box_diff": box_diff, "mean_mask_iou": statistics.fmean(ious)}


def stage_summary(passes):
    """Per stage, median over passes of the mean seconds and page faults per image."""
    names = list(passes[0][0]["seconds"])
    summary = {}
    for name in names:
        seconds = [statistics.fmean(s["seconds"][name] for s in p) for p in passes]
        faults = [statistics.fmean(s["faults"][name] for s in p) for p in passes]
        summary[name] = {"seconds": statistics.median(seconds), "faults": statistics.median(faults)}
    return summary


def print_table(figures):
    print("| method | images/s | s per image | page faults per image | speed-up per image |")
    print("| --- | --- | --- | --- | --- |")
    for method, result in figures["methods"].items():
        rate, ratio = result["images_per_s"], result["speed_up"]
        print(
            f"| {method} | {rate['median']:.4f} ({rate['min']:.4f}-{rate['max']:.4f}) | "
            f"{1 / rate['median']:.2f} | {result['faults_per_image']:,.0f} | "
            f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) |"
        )
    for method, stages in figures.get("stages", {}).items():
        print(f"\n{method}: seconds (page faults) per image")
        print(", ".join(f"{k} {v['seconds']:.2f} ({v['faults']:,.0f})" for k, v in stages.items()))
    print(f"\nsame instances as the plain loop: {figures['identity']}")
    if "onnx_agreement" in figures:
        print(f"onnx against the plain loop: {figures['onnx_agreement']}")


def export_onnx(folder, path):
    print(f"exporting the checkpoint to {path}", file=sys.stderr)
    loaded = loading.load(str(folder / "checkpoint.pth"))
    model = loaded.model
    metadata = export.file_metadata(model, export.output_names(model), vars(loaded))
    export.export_onnx(model, path, metadata)


def summarize(results, threads, args):
    """The figures of a run: speed, page faults, stages and the check of the outputs. A
    method's speed-up per image is the plain loop's time on an image over the method's, the two
    measured one after the other."""
    figures = {"machine": common.machine("cpu"), "settings": vars(args), "methods": {}}
    figures["machine"]["threads"] = threads
    plain_seconds = [s for p in results["plain"] for s in p["seconds"]]
    for method, passes in results.items():
        seconds = [s for p in passes for s in p["seconds"]]
        figures["methods"][method] = {
            "images_per_s": common.summary([len(p["seconds"]) / sum(p["seconds"]) for p in passes]),
            "speed_up": common.summary(
                [a / b for a, b in zip(plain_seconds, seconds, strict=True)]
            ),
            "faults_per_image": statistics.median(f for p in passes for f in p["faults"]),
            "seconds_per_image": [p["seconds"] for p in passes],
        }
    figures["stages"] = {
        method: stage_summary([p["stages"] for p in passes])
        for method, passes in results.items()
        if method in BREAKDOWN_METHODS
    }
    plain = results["plain"][0]["output"]
    checks = [
        same_instances(plain, p["output"])
        for method, passes in results.items()
        if method != "onnx"
        for p in passes
    ]
    differ = sum(d for _, d in checks)
    figures["identity"] = {
        "instances": checks[0][0],
        "images": len(plain),
        "differing": differ,
        "identical": differ == 0,
    }
    if "onnx" in results:
        figures["onnx_agreement"] = onnx_agreement(plain, results["onnx"][0]["output"], *args.size)
    return figures


def main(args):
    height, width = args.size
    folder = data_folder(args.images, height, width)
    if args.onnx and not Path(args.onnx).is_file():
        export_onnx(folder, args.onnx)
    methods = list(METHODS)
    methods += ALLOCATOR_METHODS if args.allocator else []
    methods += BREAKDOWN_METHODS if args.breakdown else []
    methods += ["onnx"] if args.onnx else []
    load_at_start = os.getloadavg()
    figures = summarize(*run_methods(methods, folder, args), args)
    figures["machine"]["load_average"] = {"start": load_at_start, "end": os.getloadavg()}
    print_table(figures)
    common.write_json(args.json, figures)
    if not figures["identity"]["identical"]:
        differ = figures["identity"]["differing"]
        raise SystemExit(f"predict_bench: {differ} instances differ from the plain loop's")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

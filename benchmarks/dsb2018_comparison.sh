#!/usr/bin/env bash
# Mask R-CNN, the U-Net, and their non-learned and learned ensembles (ensemble.py) on real DSB 2018
# nuclei, all from scratch on the CPU: the recipes configs/dsb2018_maskrcnn.toml and
# configs/dsb2018_unet.toml trained on the fixed split's train images, the combiner fitted on its
# fit images, every model measured on its val images (which trained and fitted nothing): segm AP
# (maxDets 500), DSB2018 score, F1 at IoU 0.5, PQ, AJI, and the missed / split / merged counts of
# error_analysis, overall and per image kind. From the repository root:
#
#     bash benchmarks/dsb2018_comparison.sh SOURCE [OUTPUT_DIR]
#
# SOURCE is what datasets/dsb2018.py --source reads (stage1_train folder, zip or git checkout).
# Steps run one after another; each step's log is <OUTPUT_DIR>/<step>.log and its wall time a line
# of <OUTPUT_DIR>/times.txt; the table is printed and written to <OUTPUT_DIR>/table.md.
#
# Steps whose result exists are skipped, so the script resumes, and reuses models trained
# elsewhere: DATA=<converted dsb2018 folder> skips the conversion, MASKRCNN=<checkpoint> and
# UNET=<checkpoint> skip the trainings, e.g.
#
#     DATA=data/dsb2018 MASKRCNN=runs/maskrcnn/checkpoint.pth UNET=runs/unet/checkpoint.pth \
#         bash benchmarks/dsb2018_comparison.sh - output/dsb2018_comparison
#
# Each training evaluates itself on two val images of each kind only (monitor.json), to spare
# the CPU; the table's figures are ensemble.py evaluate's, on every val image. SPEED_IMAGES
# (default 20) val images time each model's CPU inference, one thread, one image at a time.
set -euo pipefail

SOURCE=${1:?usage: dsb2018_comparison.sh SOURCE [OUTPUT_DIR]}
OUT=${2:-output/dsb2018_comparison}
DATA=${DATA:-$OUT/data}
MASKRCNN=${MASKRCNN:-$OUT/maskrcnn/checkpoint.pth}
UNET=${UNET:-$OUT/unet/checkpoint.pth}
ANN=$DATA/annotations
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
touch "$OUT/times.txt"

step() {  # step NAME RESULT COMMAND...: runs COMMAND unless RESULT exists, timing it
    local name=$1 result=$2 start
    shift 2
    if [ -e "$result" ]; then
        echo "$name: $result exists, skipped"
        return
    fi
    start=$(date +%s)
    "$@" > "$OUT/$name.log" 2>&1
    echo "$name $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
}

step data "$ANN/instances_val.json" python datasets/dsb2018.py --source "$SOURCE" --output "$DATA"
python - "$ANN/instances_val.json" "$OUT/monitor.json" <<'PY'
import json
import sys

data = json.load(open(sys.argv[1]))
per_kind = {}
for image in data["images"]:
    per_kind.setdefault(image.get("kind"), []).append(image)
data["images"] = [image for images in per_kind.values() for image in images[:2]]
ids = {image["id"] for image in data["images"]}
data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
json.dump(data, open(sys.argv[2], "w"))
PY

SPLITS=(--train-ann "$ANN/instances_train.json" --train-images "$DATA/train"
        --val-ann "$OUT/monitor.json" --val-images "$DATA/val" --device cpu)
step train_maskrcnn "$MASKRCNN" python train.py --config configs/dsb2018_maskrcnn.toml \
    "${SPLITS[@]}" --output-dir "$(dirname "$MASKRCNN")"
step train_unet "$UNET" python train.py --config configs/dsb2018_unet.toml \
    "${SPLITS[@]}" --output-dir "$(dirname "$UNET")"

# FIT_STRIDE=n and VAL_STRIDE=n keep every n-th image of each kind (default 1: all), for a CPU
# that cannot afford the whole splits; the table then says how many images it measured.
every_nth() {  # every_nth SPLIT STRIDE: the split's annotation file, or its every-nth subset
    local split=$1 stride=$2
    if [ "$stride" = 1 ]; then
        echo "$ANN/instances_$split.json"
        return
    fi
    python - "$ANN/instances_$split.json" "$OUT/${split}_every$stride.json" "$stride" <<'PY'
import json
import sys

data = json.load(open(sys.argv[1]))
stride = int(sys.argv[3])
per_kind = {}
for image in data["images"]:
    per_kind.setdefault(image.get("kind"), []).append(image)
data["images"] = [image for images in per_kind.values() for image in images[::stride]]
ids = {image["id"] for image in data["images"]}
data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
json.dump(data, open(sys.argv[2], "w"))
PY
    echo "$OUT/${split}_every$stride.json"
}
FIT_ANN=$(every_nth fit "${FIT_STRIDE:-1}")
VAL_ANN=$(every_nth val "${VAL_STRIDE:-1}")

step fit "$OUT/ensemble.pth" python ensemble.py fit --maskrcnn "$MASKRCNN" --unet "$UNET" \
    --val-ann "$FIT_ANN" --val-images "$DATA/fit" --output "$OUT/ensemble.pth"
step evaluate "$OUT/metrics_learned.json" python ensemble.py evaluate \
    --weights "$OUT/ensemble.pth" --val-ann "$VAL_ANN" --val-images "$DATA/val" \
    --mode maskrcnn unet baseline learned --output-dir "$OUT"
step speed "$OUT/speed.json" python benchmarks/dsb2018_speed.py --weights "$OUT/ensemble.pth" \
    --ann "$VAL_ANN" --images "$DATA/val" --count "${SPEED_IMAGES:-20}" \
    --output "$OUT/speed.json"

python - "$OUT" <<'PY' | tee "$OUT/table.md"
import json
import sys

out = sys.argv[1]
names = {
    "maskrcnn": "Mask R-CNN",
    "unet": "U-Net",
    "baseline": "non-learned ensemble",
    "learned": "learned ensemble",
}
metrics = {mode: json.load(open(f"{out}/metrics_{mode}.json")) for mode in names}
speed = json.load(open(f"{out}/speed.json"))


def row(name, nuclei, errors):
    return (
        f"| {name} | {nuclei['images']} | {nuclei['dsb']:.3f} | {nuclei['f1_iou50']:.3f} | "
        f"{nuclei['pq']:.3f} | {nuclei['aji']:.3f} | {errors['true_positive']} | "
        f"{errors['missed']} | {errors['split_gt']} | {errors['merged_gt']} | {errors['extra']} |"
    )


COLUMNS = "images | DSB2018 | F1@0.5 | PQ | AJI | matched | missed | split | merged | extra |"
print(f"| model | {COLUMNS} segm AP (maxDets 500) | AP50 | images/s (CPU, 1 thread) |")
print("|---" * 14 + "|")
for mode, name in names.items():
    m = metrics[mode]
    extra = f" {m['segm_AP']:.3f} | {m['segm_AP50']:.3f} | {speed[mode]:.2f} |"
    print(row(name, m["nuclei"]["all"], m["errors"]["all"]) + extra)
print()
print("Per image kind:")
print()
print(f"| kind | model | {COLUMNS}")
print("|---" * 12 + "|")
for kind in metrics["learned"]["nuclei"]:
    if kind != "all":
        for mode, name in names.items():
            m = metrics[mode]
            print(row(f"{kind} | {name}", m["nuclei"][kind], m["errors"][kind]))
print()
print("Wall times:", open(f"{out}/times.txt").read().strip().replace("\n", "; "))
PY

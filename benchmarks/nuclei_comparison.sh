#!/usr/bin/env bash
# Mask R-CNN, the U-Net, and their non-learned and learned ensembles (ensemble.py) on the hard
# synthetic nuclei of `make_demo.py --style nuclei`: segm AP, AP50, AP75 and the DSB2018 score on
# val2017, a split that trained no model and fitted no combiner. The README's nuclei comparison
# table comes from this script. On the CPU, from the repository root:
#
#     bash benchmarks/nuclei_comparison.sh [OUTPUT_DIR]
#
# Steps run one after another. Each step's log is <OUTPUT_DIR>/<step>.log, its wall time a line
# of <OUTPUT_DIR>/times.txt; the table is printed at the end and written to
# <OUTPUT_DIR>/table.md. train.py's own evaluation after each epoch only watches the training, on
# two val2017 images (monitor.json) to spare the CPU; the table's numbers are ensemble.py's, on
# all of val2017.
set -euo pipefail

OUT=${1:-output/nuclei_comparison}
DATA=$OUT/data
ANN=$DATA/annotations
mkdir -p "$OUT"
: > "$OUT/times.txt"

step() {  # step NAME COMMAND...: runs COMMAND with its output in NAME.log, records its wall time
    local name=$1 start
    shift
    start=$(date +%s)
    "$@" > "$OUT/$name.log" 2>&1
    echo "$name $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
}

COMMON=(--data-path "$DATA" --val-ann "$OUT/monitor.json" -b 2 -j 0 --min-size 192
        --max-size 192 --opt adamw --clip-grad-norm 10 --lr-scheduler cosineannealinglr
        --seed 0 --device cpu --dsb-score)

step data python datasets/make_demo.py --style nuclei --output "$DATA" \
    --num-train 100 --num-fit 30 --num-val 30
python - "$ANN/instances_val2017.json" "$OUT/monitor.json" <<'PY'
import json
import sys

data = json.load(open(sys.argv[1]))
data["images"] = data["images"][:2]
ids = {image["id"] for image in data["images"]}
data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
json.dump(data, open(sys.argv[2], "w"))
PY

step train_maskrcnn python train.py "${COMMON[@]}" \
    --model maskrcnn_resnet50_fpn --output-dir "$OUT/maskrcnn" --epochs 2 --lr 0.0005 \
    --rpn-post-nms-top-n-train 300 --rpn-post-nms-top-n-test 300 --box-batch-size-per-image 32 \
    --box-score-thresh 0 --anchor-sizes 8 16 32 64 128 --box-detections-per-img 100
step train_unet python train.py "${COMMON[@]}" \
    --model unet_resnet18 --output-dir "$OUT/unet" --epochs 6 --lr 0.001

step fit python ensemble.py fit --maskrcnn "$OUT/maskrcnn/checkpoint.pth" \
    --unet "$OUT/unet/checkpoint.pth" --val-ann "$ANN/instances_fit2017.json" \
    --val-images "$DATA/fit2017" --output "$OUT/ensemble.pth"

step evaluate python ensemble.py evaluate --weights "$OUT/ensemble.pth" \
    --val-ann "$ANN/instances_val2017.json" --val-images "$DATA/val2017" \
    --mode maskrcnn unet baseline learned --output-dir "$OUT"

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
print("| model | segm AP | AP50 | AP75 | DSB2018 |")
print("|---|---|---|---|---|")
for mode, name in names.items():
    with open(f"{out}/metrics_{mode}.json") as f:
        m = json.load(f)
    print(f"| {name} | {m['segm_AP']:.3f} | {m['segm_AP50']:.3f} | {m['segm_AP75']:.3f} "
          f"| {m['dsb']:.3f} |")
PY

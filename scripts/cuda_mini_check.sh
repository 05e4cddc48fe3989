#!/usr/bin/env bash
# Train + evaluate the mini Faster R-CNN with AGVM on CUDA: fp32 and AMP (detectron2's AMP
# path: Φ from unscaled gradients, overflowed steps leave μ alone). Prints box AP, time and
# the final μ of each; copies metrics.json and log.txt of each run into $RESULTS (default
# output/cuda_check). Needs a CUDA GPU and the environment of `make install`.
#   scripts/cuda_mini_check.sh [python]
set -euo pipefail
PY=${1:-python3}
RESULTS=${RESULTS:-output/cuda_check}
CFG=projects/faster_rcnn/configs/mini/faster_rcnn_R18_FPN_shapes_agvm.yaml
mkdir -p "$RESULTS"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
for mode in fp32 amp; do
  amp=False; [ "$mode" = amp ] && amp=True
  work=$(mktemp -d)
  start=$(date +%s)
  "$PY" projects/faster_rcnn/train_net.py --config-file "$CFG" MODEL.DEVICE cuda SOLVER.AMP.ENABLED "$amp" \
    DATALOADER.NUM_WORKERS 4 OUTPUT_DIR "$work" > "$RESULTS/$mode.log" 2>&1 || { tail -40 "$RESULTS/$mode.log"; exit 1; }
  end=$(date +%s)
  cp "$work/metrics.json" "$RESULTS/${mode}_metrics.json"
  "$PY" - "$work/metrics.json" "$mode" "$((end - start))" <<'PY'
import json, sys
merged = {}
for line in open(sys.argv[1]):
    if line.strip():
        merged.update(json.loads(line))
mu = {k[8:]: round(v, 3) for k, v in merged.items() if k.startswith("agvm/mu/")}
print(f"{sys.argv[2]}: box AP {merged.get('bbox/AP', float('nan')):.2f}, wall {sys.argv[3]} s, "
      f"skipped {merged.get('agvm/skipped')}, final mu {mu}")
PY
  rm -rf "$work"
done

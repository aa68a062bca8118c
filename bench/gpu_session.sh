#!/usr/bin/env bash
# One GPU session's measurements, as one command (docs/results.md 1 and 4.5): the step benchmark on CUDA, then
# the comparison sweeps at configs/gpu-64px.yaml's scale (ISIC 2018 at 64 px, RetinaMNIST at 28 px, 15 epochs)
# and the ablation, with trial histories archived to OUT as they come, all within BUDGET seconds.
#   bench/gpu_session.sh ISIC_PREPARED RETINA_PREPARED OUT [BUDGET_S]
# Needs torch, torchvision, pyarrow, pyyaml, pillow, numpy and matplotlib; not Ray.
set -uo pipefail
isic=$1 retina=$2 out=$3 budget=${4:-540}
python=${PYTHON:-python3} device=${DEVICE:-cuda} parallel=${PARALLEL:-8}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
runs=$(mktemp -d)
mkdir -p "$out"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  nproc
  "$python" -c "import sys, torch, torchvision; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
} > "$out/machine.txt" 2>&1

for args in "--arch resnet18 --image-size 64 --batch-sizes 64 --queue-sizes 1024 4096" \
            "--arch resnet50 --image-size 224 --batch-sizes 64 128 --queue-sizes 4096"; do
  # shellcheck disable=SC2086
  timeout 60 "$python" bench/bench_step.py --device "$device" $args --skip-sync >> "$out/bench_step.md" 2>&1
done

archive() { tar czf "$out/sweeps.tar.gz.part" -C "$runs" . && mv "$out/sweeps.tar.gz.part" "$out/sweeps.tar.gz"; }
(while sleep 20; do archive; done) &
archiver=$!

sweep() {  # the rest of the budget for one local sweep; its trial processes end with it
  local left=$((budget - SECONDS))
  if ((left < 10)); then echo "no time left for: $*" >> "$out/sweeps.log"; return; fi
  echo "== $* ($left s left)" >> "$out/sweeps.log"
  timeout --kill-after=5 "$left" "$python" -m proco_ray local-sweep --device "$device" --parallel "$parallel" \
    --threads 1 --workers 1 --config gpu-64px "$@" >> "$out/sweeps.log" 2>&1
  pkill -f "multiprocessing.spawn" || true
}
sweep --experiment compare --data "$isic" --out "$runs/compare-isic64" data.num_classes=7
sweep --experiment compare --data "$retina" --out "$runs/compare-retina28" data.num_classes=5 data.image_size=28
sweep --experiment ablation --only proto_loss_only,plus_proto_instances,plus_recalibration,loss_ce,loss_infonce \
  --data "$isic" --out "$runs/ablation-isic64" data.num_classes=7
kill "$archiver"
archive

#!/usr/bin/env bash
# Everything to measure when a GPU machine is lent, as one command of at most 9 minutes (docs/results.md, "On a GPU"):
#   bench/gpu_session.sh OUT [BUDGET_S]
# 1. the training step alone (bench/bench_step.py): resnet18 at 64 px and resnet50 at 224 px, batch 128, bfloat16;
# 2. the views made on the device (bench/bench_ingest.py's view-making rate) at 64 and 224 px;
# 3. the Ray path (bench/gpu_session.py): Ray Train on the GPU at 64 and 224 px, 2 workers sharing it over gloo,
#    and a proco-ray tune of 4 quarter-GPU trials, on generated images prepared there.
# A machine without Ray gets it from .gpu-carry (bench/pack_gpu_carry.sh), unpacked onto PYTHONPATH.
# DEVICE=cpu dry-runs every step on the CPU at toy sizes.
set -uo pipefail
out=$1 budget=${2:-520}
python=${PYTHON:-python3} device=${DEVICE:-cuda} carry=${CARRY:-.gpu-carry}
deadline=$(($(date +%s) + budget))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
if ! "$python" -c "import ray" 2>/dev/null; then
  [ -f "$carry/ray.tar.xz" ] || { echo "no Ray here and no $carry/ray.tar.xz (bench/pack_gpu_carry.sh)" >&2; exit 2; }
  site=$(mktemp -d)
  tar -xJf "$carry/ray.tar.xz" -C "$site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$carry"/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
left() { echo $((deadline - $(date +%s))); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  nproc
  "$python" -c "import sys, torch, torchvision, ray; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ "$device" = cuda ]; then
  steps=("--arch resnet18 --image-size 64 --batch-sizes 128 --steps 10" "--arch resnet50 --image-size 224 --batch-sizes 128 --steps 10")
else
  steps=("--arch resnet18 --image-size 16 --batch-sizes 16 --steps 2")
fi
for args in "${steps[@]}"; do
  # shellcheck disable=SC2086
  timeout "$(( $(left) > 90 ? 90 : $(left) ))" "$python" bench/bench_step.py --device "$device" $args \
    --queue-sizes 4096 --bank-sizes 4096 --skip-sync 2>&1 | tee -a "$out/bench_step.md"
done

timeout 60 "$python" -c "import json, sys; sys.path.insert(0, 'bench'); from bench_ingest import augment_rate
print(json.dumps({size: augment_rate(size, sys.argv[1], seconds=2.0) for size in (64, 224)}))" "$device" 2>&1 | tee "$out/augment.json"

timeout --kill-after=10 "$(left)" "$python" bench/gpu_session.py --out "$out" --device "$device" --deadline "$deadline" 2>&1 \
  | tee "$out/ray_runs.log" | grep -v "^\s*$" | tail -40

#!/usr/bin/env bash
# The prepared GPU check of issue #3, in one command on a CUDA machine (a few minutes on one H200):
#   bash bench/gpu_check.sh                 (OUT=gpu_check_out STEPS=300 IDS=1000 BATCH=256 override)
# Runs main.py for STEPS steps each with bf16 AMP, fp16 AMP (GradScaler), bf16 + --compile, and 2-process DDP
# (torchrun; on a single GPU both ranks share it through --dist_backend gloo, NCCL refuses that), then prints
# steps/s, data-wait share and the held-out R@1 of each run from its train.log, side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
STEPS=${STEPS:-300}
IDS=${IDS:-1000}
BATCH=${BATCH:-256}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

$PY -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', ok, \
torch.cuda.device_count(), torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 'error: no CUDA device')"
N_GPU=$($PY -c "import torch; print(torch.cuda.device_count())")

$PY tools/make_synthetic_pedes.py --out "$OUT/data" --ids "$IDS" --images_per_id 4 --seed 0
DATA="$OUT/data/synthpedes-dataset.json"
$PY tools/extract_label.py --data "$DATA" --embedding_path "$OUT/emb" --teacher attributes --device cuda

COMMON=(--data "$DATA" --embedding_path "$OUT/emb" --output_dir "$OUT/logs" --iters "$STEPS" --batch_size "$BATCH"
        --eval_every 0 --save_every "$STEPS" --log_every 50 --workers 8 --resume auto)
run() {  # name, then extra flags; a failing variant is reported and the others still run
  local name=$1; shift
  echo; echo "==== $name: $*"
  if ! "$@" "${COMMON[@]}" --run_name "$name"; then echo "FAILED: $name"; fi
}
run bf16 $PY main.py --amp bf16
run fp16 $PY main.py --amp fp16
run bf16_compile $PY main.py --amp bf16 --compile
BACKEND=gloo; [ "$N_GPU" -ge 2 ] && BACKEND=nccl
run ddp2_$BACKEND $PY -m torch.distributed.run --standalone --nproc_per_node 2 main.py --amp bf16 --dist_backend $BACKEND

echo; echo "==== summary ($STEPS steps, batch $BATCH per process)"
for name in bf16 fp16 bf16_compile ddp2_$BACKEND; do
  log=$(ls "$OUT"/logs/*/"$name"/train.log 2>/dev/null | head -1 || true)
  done_line=$([ -n "$log" ] && grep -h "done:" "$log" | tail -1 | sed 's/.*done: //' || echo "no log")
  r1=$([ -n "$log" ] && grep -ho "Eval Iter:[0-9]*|.* r1: [0-9.]*" "$log" | tail -1 | grep -o "r1: [0-9.]*" || true)
  printf '%-16s %s  %s\n' "$name" "${done_line:-FAILED}" "$r1"
done

#!/usr/bin/env bash
# The whole pipeline on built-in synthetic data with the offline attribute teacher, on CPU, in minutes:
#   bash quickstart.sh            (OUT=quickstart_out by default; re-running resumes/reuses what is done)
# Steps: install -> synthetic SYNTH-PEDES data -> teacher cache (all-MiniLM-L6-v2 attribute teacher) ->
# teacher's table -> train the student -> student's table -> ONNX export -> enrol a gallery of unseen people ->
# two queries (English, Chinese) with the CLI.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-quickstart_out}
PY=${PYTHON:-python3}
IDS=${IDS:-1000}              # identities the held-out test/validation ids are drawn from
EXTRA_IDS=${EXTRA_IDS:-4000}  # more training-only identities: more people to learn from, the same test ids
ITERS=${ITERS:-1100}
SIZE=192x96                   # student input HxW (the run folder is named after it)
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
step() { printf '\n==== %s\n' "$*"; }

step "0/8 install (requirements.txt; quick when already installed)"
bash tools/install.sh

step "1/8 synthetic SYNTH-PEDES data: $IDS identities (+ $EXTRA_IDS training-only) x 4 images"
$PY tools/make_synthetic_pedes.py --out "$OUT/data" --ids "$IDS" --extra_train_ids "$EXTRA_IDS" --images_per_id 4 \
  --seed 0
DATA="$OUT/data/synthpedes-dataset.json"

step "2/8 teacher cache (offline attribute teacher: all-MiniLM-L6-v2)"
$PY tools/extract_label.py --data "$DATA" --embedding_path "$OUT/embeddings" --teacher attributes

step "3/8 the teacher's table on the held-out identities"
$PY evaluation_labels.py --data "$DATA" --embedding_path "$OUT/embeddings" --top_k 5

step "4/8 train the student ($ITERS iterations, CPU)"
$PY main.py --data "$DATA" --embedding_path "$OUT/embeddings" --output_dir "$OUT/logs" --run_name quickstart \
  --resume auto --backbone res_tiny --text_backbone char_tiny --image_size "$SIZE" --feature_dim 256 \
  --batch_size 64 --instances_per_id 4 --iters "$ITERS" --warmup 50 --lr 2e-3 --eval_every 500 --save_every 500 \
  --log_every 100 --workers 2
RUN="$OUT/logs/expModel-res_tiny-$SIZE-256/quickstart"

step "5/8 the student's table on the held-out identities (+ det.png, retrieval.png, learning_curve.png)"
$PY evaluation_model.py "$RUN/best.pt" --top_k 5 --plots "$OUT/plots"

step "6/8 export to ONNX"
$PY export_model.py "$RUN/best.pt" "$OUT/export"

step "7/8 enrol a gallery of 40 unseen people"
$PY tools/make_synthetic_pedes.py --out "$OUT/gallery" --ids 40 --images_per_id 2 --seed 1 --no_zh
$PY search/enroll_by_onnx.py --image-dir "$OUT/gallery/Part1" --output-prefix "$OUT/collection/person" \
  --model_dir "$OUT/export"

step "8/8 search"
$PY search/api.py --image-root "$OUT/gallery/Part1" --image_feature "$OUT/collection/person_features.npy" \
  --image_metadata "$OUT/collection/person_metadata.json" --text-model "$OUT/export/model_text.onnx" \
  --queries "a man wearing a red shirt" "穿着红色外套的女人" --top-n 3

cat <<EOF

==== done. Artifacts:
  data            $OUT/data  (and the gallery $OUT/gallery)
  teacher cache   $OUT/embeddings
  run             $RUN  (last.pt, best.pt = best validation R@1, args.json, train.log)
  plots           $OUT/plots  (det.png, retrieval.png, learning_curve.png; also in TensorBoard)
  ONNX export     $OUT/export  (model_image.onnx, model_text.onnx, input_embeddings.pt.npy, query_vocab.txt, query_bank.npy, model_info.json)
  collection      $OUT/collection/person_features.npy + person_metadata.json
TensorBoard:  tensorboard --logdir $OUT/logs
Web UI:       $PY search/app_onnx.py --image-root $OUT/gallery/Part1 --image_feature $OUT/collection/person_features.npy --image_metadata $OUT/collection/person_metadata.json --text-model $OUT/export/model_text.onnx --port 5005
              then open http://127.0.0.1:5005
EOF

#!/usr/bin/env bash
# Issue #6 on a machine without a GPU (the numbers in the README's "Domain pretraining on
# CamVid" section): DINO-pretrain a tiny ViT-S/8 on the CamVid train images on the CPU for
# a bounded time, then run the raw-feature baseline and STEGO on CamVid val with that
# backbone and with the same architecture randomly initialised, and tabulate both.
#
#   bash benchmarks/pretrain_cpu.sh            # ~25 min pretraining + 2 x `stegoseg run`
#   PRETRAIN_MINUTES=5 STEPS=300 bash benchmarks/pretrain_cpu.sh   # quicker, noisier
#
# On a GPU, `bash benchmarks/gpu_session.sh pretrain` does the same with a full-size ViT-S/16.
set -euo pipefail
CAMVID=${CAMVID:-../shared/data/camvid}
RUNS=${RUNS:-runs}
MINUTES=${PRETRAIN_MINUTES:-25}
STEPS=${STEPS:-1000}
P=$RUNS/pretrain-camvid-tiny
CLASSES=sky,building,pole,road,pavement,tree,sign/symbol,fence,car,pedestrian,bicyclist

if [[ ! -f $P/backbone.pt ]]; then
  stegoseg pretrain --data-root "$CAMVID" --arch dino_vits8 --tiny --epochs 80 --warmup-epochs 10 --batch-size 16 \
    --base-lr 0.008 --global-crop-size 112 --local-crop-size 48 --out-dim 4096 --hidden-dim 512 \
    --max-minutes "$MINUTES" --readout-every 300 --num-workers 2 --no-progress --out "$P"
fi

# The backbone of bench_label_free's and bench_methods' camvid-tiny-dino setting (committed, so that
# their stored rows stay reusable; never overwritten here).
mkdir -p benchmarks/results/backbones
cp -n "$P/backbone.pt" benchmarks/results/backbones/camvid-tiny-dino.pt

# The README's table used the reference's loss settings and probe: CocoStuff shifts, online cluster
# probe, last checkpoint (since issue #10 the defaults are --shifts auto --select label-free
# --cluster-fit kmeans; pinned here so that the script reproduces its table).
COMMON=(--data-root "$CAMVID" --class-names "$CLASSES" --backbone dino_vits8 --tiny --seed 0 --steps "$STEPS"
        --num-workers 2 --crf-workers 2 --no-progress --shifts fixed --select last --cluster-fit online)
# The same architecture twice: the DINO-pretrained weights file, and a random initialisation
# (--no-pretrained: torch's default generator state at process start draws it, the same in every run).
for NAME in camvid-tiny-random camvid-tiny-dino; do
  if [[ $NAME == camvid-tiny-dino ]]; then B=(--weights "$P/backbone.pt"); else B=(--no-pretrained); fi
  if [[ ! -f $RUNS/$NAME/summary.json ]]; then
    SECONDS=0
    stegoseg run --out "$RUNS/$NAME" "${COMMON[@]}" "${B[@]}"
    echo "$NAME: ${SECONDS} s"
  fi
done
# STEGO again with the cluster probe refitted by k-means on the trained code (--cluster-fit kmeans):
# same cache, seed and schedule, so the same head; only the centroids differ.
for NAME in camvid-tiny-random camvid-tiny-dino; do
  if [[ $NAME == camvid-tiny-dino ]]; then B=(--weights "$P/backbone.pt"); else B=(--no-pretrained); fi
  K=$RUNS/$NAME-kmeans
  if [[ ! -f $K/eval/metrics.json ]]; then
    stegoseg train --out "$K/train" --cache-dir "$RUNS/$NAME/cache" "${COMMON[@]}" "${B[@]}" --cluster-fit kmeans
    stegoseg evaluate "$K/train/checkpoint.pt" --out "$K/eval" --no-progress
  fi
done
stegoseg compare "$RUNS"/camvid-tiny-random/{eval,baseline} "$RUNS"/camvid-tiny-random-kmeans/eval \
  "$RUNS"/camvid-tiny-dino/{eval,baseline} "$RUNS"/camvid-tiny-dino-kmeans/eval --out-md "$RUNS/pretrain-compare.md"

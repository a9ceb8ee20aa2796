#!/usr/bin/env bash
# What was run on the lent GPU machine (see README "Measured numbers"). Expects the
# CamVid copy in .device-data/camvid and wheels in .whl (faiss-cpu, pydensecrf2 sdist).
set -euo pipefail
STAGE=${1:-all}
RES=${OUT:-runs/gpu}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/faiss_cpu-*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/pydensecrf2-*.tar.gz
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, timm, lightning, faiss, pydensecrf.densecrf; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)"
CAMVID=.device-data/camvid
# the README's CamVid table: the reference's loss settings and probe (CocoStuff shifts, online probe, last step)
COMMON="--data-root $CAMVID --backbone dino_vits8 --no-pretrained --seed 0 --crf-workers 14 --num-workers 4 --no-progress --shifts fixed --select last --cluster-fit online"
if [[ $STAGE == bench || $STAGE == all ]]; then
  (cd benchmarks && python3 bench_inference.py && python3 bench_crf.py --n 64 --workers 14 --data-root ../$CAMVID \
     && python3 bench_train_throughput.py --data-root ../$CAMVID --steps 30 && python3 bench_knn.py)
  cp benchmarks/results/*.json "$RES"/ 2>/dev/null || true
fi
if [[ $STAGE == camvid || $STAGE == all ]]; then
  time python3 -m stegoseg run --out runs/camvid-vits8-random $COMMON --steps ${STEPS:-5000} 2>&1 | grep -v -E "Tip|LeafSpec" | tail -40
  tar czf "$RES"/camvid-vits8-random.tar.gz --exclude=cache --exclude=lightning --exclude='*.pt' runs/camvid-vits8-random
fi
if [[ $STAGE == pretrain ]]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/lightly-*.whl .whl/hydra_core-*.whl .whl/omegaconf-*.whl .whl/antlr4*.whl
  P=runs/pretrain-camvid-vits16
  time python3 -m stegoseg pretrain --data-root $CAMVID --arch dino_vits16 --epochs 100 --batch-size 64 --num-workers 14 \
     --readout-every 100 --readout-images 64 --max-minutes ${PRETRAIN_MINUTES:-3.5} --no-progress --out $P 2>&1 | grep -v -E "Tip|LeafSpec|rank_zero|WeightNorm|weight_norm" | tail -15
  cp $P/readout.json $P/readout.png "$RES"/
  for B in "--weights $P/backbone.pt" "--no-pretrained"; do
    NAME=camvid-vits16-$([[ $B == --no-pretrained ]] && echo random || echo camvid-dino)
    time python3 -m stegoseg run --out runs/$NAME --data-root $CAMVID --backbone dino_vits16 $B --seed 0 --steps ${STEPS:-1500} \
       --crf-workers 14 --num-workers 4 --no-progress 2>&1 | grep -E "STEGO|raw features|error"
    tar czf "$RES"/$NAME.tar.gz --exclude=cache --exclude=lightning --exclude='*.pt' --exclude=segment runs/$NAME
  done
fi

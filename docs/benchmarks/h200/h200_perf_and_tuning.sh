# One GPU session: throughput per prompt layer, then validation tuning on Medical Abstracts.
# DRY=1 runs a tiny version on the CPU here to check the script.
set -u
RC='backbone=".device/minilm" data-source=".device/ma.csv"'
M="python3 docs/benchmarks/h200/run_without_flower.py"
if [ "${DRY:-0}" = 1 ]; then
  PERF="--prompt-layers 6 --batch-size 4 --steps 2"; G1='prompt-layer=[6]'; G2='learning-rate=[0.01]'; G3='learning-rate=[0.01]'; SW=medical_abstracts; SW3=synthetic
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  PERF="--prompt-layers 0,1,2,3,4,5,6 --batch-size 64 --steps 20"
  G1='prompt-layer=[0,1,2,3,4,5,6]'; G2='learning-rate=[0.0003,0.001,0.003,0.01]'; G3='learning-rate=[0.0003,0.001,0.003,0.01]'; SW=medical_abstracts; SW3=synthetic
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD" PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/xdg COLUMNS=160
python3 -c "import torch, transformers, opacus; print('torch', torch.__version__, 'transformers', transformers.__version__, 'opacus', opacus.__version__, 'cuda', torch.cuda.is_available())"
t0=$(date +%s)
$M benchmark perf --backbone .device/minilm $PERF --out $OUT/perf_gpu.json; echo "perf took $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
$M benchmark tune --sweep $SW --grid "$G1" --epsilon 8 --run-config "$RC" --out /tmp/t1 && cp /tmp/t1/tuning.json $OUT/tune_ma_layers_eps8.json; echo "tune1 took $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
$M benchmark tune --sweep $SW --grid "$G2" --epsilon inf --run-config "$RC" --out /tmp/t2 && cp /tmp/t2/tuning.json $OUT/tune_ma_lr_nodp.json; echo "tune2 took $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
$M benchmark tune --sweep $SW3 --grid "$G3" --epsilon inf --run-config 'backbone=".device/minilm"' --out /tmp/t3 && cp /tmp/t3/tuning.json $OUT/tune_synth_lr_nodp.json; echo "tune3 took $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
$M benchmark tune --sweep $SW3 --grid "$G1" --epsilon 8 --run-config 'backbone=".device/minilm"' --out /tmp/t4 && cp /tmp/t4/tuning.json $OUT/tune_synth_layers_eps8.json; echo "tune4 took $(( $(date +%s) - t0 )) s"

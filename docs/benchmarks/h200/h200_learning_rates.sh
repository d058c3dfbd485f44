# Second GPU call: Medical Abstracts learning rate and passes under DP, on validation only.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/xdg COLUMNS=160
RC='backbone=".device/minilm" data-source=".device/ma.csv"'
M="python3 docs/benchmarks/h200/run_without_flower.py"
$M benchmark tune --sweep medical_abstracts --grid 'learning-rate=[0.001,0.003,0.01]' --grid 'local-epochs=[1,2]' --epsilon 8 --run-config "$RC" --out /tmp/t5 && cp /tmp/t5/tuning.json $OUT/tune_ma_lr_eps8.json
$M benchmark tune --sweep medical_abstracts --grid 'learning-rate=[0.001,0.003,0.01]' --epsilon 1 --run-config "$RC" --out /tmp/t6 && cp /tmp/t6/tuning.json $OUT/tune_ma_lr_eps1.json
$M benchmark tune --sweep medical_abstracts --grid 'learning-rate=[0.0003,0.001]' --grid 'local-epochs=[2]' --epsilon inf --run-config "$RC" --out /tmp/t7 && cp /tmp/t7/tuning.json $OUT/tune_ma_lr_nodp_10passes.json

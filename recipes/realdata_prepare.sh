#!/usr/bin/env bash
# Prepare recipes/realdata.yaml: the SmolLM2 folder, and the length distribution of every file it reads.
#   bash recipes/realdata_prepare.sh [MAX_LENGTH]        (from the repository root; ../shared/realdata needed)
# Links models/smollm2-135m-instruct to the folder `dreamprm smollm2` builds once in its cache (no second
# 540 MB copy; an existing real folder there is used as it is) and prints, for the SmolLM2 tokenizer with the chat
# template, each file's token lengths and what MAX_LENGTH (default 2048) cuts: the training sources
# (ProcessBench math, olympiadbench, omnimath: first-error step labels), the meta data (GSM8K best-of-4
# candidates: outcomes) and the eval file (ProcessBench gsm8k).
set -euo pipefail
MAX_LENGTH=${1:-2048}
REAL=${DREAMPRM_SHARED:-../shared}/realdata
MODEL=models/smollm2-135m-instruct
CACHED=$(realpath "$(dreamprm smollm2 | tail -n 1)")   # built once (~/.cache/dreamprm or $DREAMPRM_SMOLLM2_DIR)
if [ -d "$MODEL" ] && [ ! -L "$MODEL" ]; then
  echo "using the existing folder $MODEL (delete it to link $CACHED instead and free its space)"
else
  mkdir -p "$(dirname "$MODEL")"
  ln -sfn "$CACHED" "$MODEL"
fi
for split in math olympiadbench omnimath; do
  echo "== train: ProcessBench $split"
  dreamprm data check "$REAL/processbench/$split.json" --from processbench --tokenizer "$MODEL" --max_length "$MAX_LENGTH"
done
echo "== meta: GSM8K best-of-4 candidates"
dreamprm data check "$REAL/gsm8k_openai_model_solutions/example_model_solutions.jsonl" --from gsm8k_candidates \
  --tokenizer "$MODEL" --max_length "$MAX_LENGTH"
echo "== eval: ProcessBench gsm8k"
dreamprm data check "$REAL/processbench/gsm8k.json" --from processbench --tokenizer "$MODEL" --max_length "$MAX_LENGTH"
echo "model: $MODEL"

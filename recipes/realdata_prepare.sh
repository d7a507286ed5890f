#!/usr/bin/env bash
# Prepare recipes/realdata.yaml: the SmolLM2 folder, and the length distribution of every file it reads.
#   bash recipes/realdata_prepare.sh [MAX_LENGTH]        (from the repository root; ../shared/realdata needed)
# Builds models/smollm2-135m-instruct (dreamprm smollm2) and prints, for the SmolLM2 tokenizer with the chat
# template, each file's token lengths and what MAX_LENGTH (default 2048) cuts: the training sources
# (ProcessBench math, olympiadbench, omnimath: first-error step labels), the meta data (GSM8K best-of-4
# candidates: outcomes) and the eval file (ProcessBench gsm8k).
set -euo pipefail
MAX_LENGTH=${1:-2048}
REAL=${DREAMPRM_SHARED:-../shared}/realdata
MODEL=models/smollm2-135m-instruct
dreamprm smollm2 --out "$MODEL"
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

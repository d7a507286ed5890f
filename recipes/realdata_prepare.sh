#!/usr/bin/env bash
# Prepare recipes/realdata.yaml: real step labels to train on, their length distribution, the model.
#   bash recipes/realdata_prepare.sh [MAX_LENGTH]        (from the repository root; ../shared/realdata needed)
# Writes data/realdata/train.jsonl (ProcessBench math + olympiadbench + omnimath, 3000 records with
# first-error step labels) and builds the SmolLM2 folder (dreamprm smollm2). Meta and eval data are read
# in place: GSM8K best-of-4 candidates (outcome labels) and ProcessBench gsm8k (step labels).
set -euo pipefail
MAX_LENGTH=${1:-2048}
REAL=${DREAMPRM_SHARED:-../shared}/realdata
mkdir -p data/realdata
for split in math olympiadbench omnimath; do
  dreamprm data convert --from processbench "$REAL/processbench/$split.json" "data/realdata/$split.jsonl"
done
cat data/realdata/{math,olympiadbench,omnimath}.jsonl > data/realdata/train.jsonl
MODEL=models/smollm2-135m-instruct
dreamprm smollm2 --out "$MODEL"
echo "== train: length distribution as trained (SmolLM2 tokenizer, chat template) and what $MAX_LENGTH cuts"
dreamprm data check data/realdata/train.jsonl --tokenizer "$MODEL" --max_length "$MAX_LENGTH"
echo "== meta: GSM8K best-of-4 candidates"
dreamprm data check "$REAL/gsm8k_openai_model_solutions/example_model_solutions.jsonl" --from gsm8k_candidates \
  --tokenizer "$MODEL" --max_length "$MAX_LENGTH"
echo "== eval: ProcessBench gsm8k"
dreamprm data check "$REAL/processbench/gsm8k.json" --from processbench --tokenizer "$MODEL" --max_length "$MAX_LENGTH"
echo "model: $MODEL"

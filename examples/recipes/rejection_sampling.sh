#!/usr/bin/env bash
# Rejection-sampling fine-tuning (best-of-N SFT; "expert iteration", ReST-EM): ROUNDS rounds of
#   sample N replies per prompt → score them with a judge → keep the best → SFT on them,
# each round starting from the model the round before trained. Run it from the repository root:
#
#   bash examples/recipes/rejection_sampling.sh MODEL PROMPTS JUDGE OUT_DIR [ROUNDS]
#   bash examples/recipes/rejection_sampling.sh smollm2-135m-instruct examples/data/arithmetic.jsonl \
#       fn:examples.rewards:exact_match outputs/rejection 3
#
# Budgets and options come from the environment (defaults in brackets): N [8] replies per prompt,
# MAX_NEW_TOKENS [32], SFT_STEPS [50], LR [1e-5], PRECISION [auto], and SELECT [empty: the best
# reply per prompt] — best-of-n options, e.g. SELECT="--threshold 1" keeps every correct reply.
# Round r writes OUT_DIR/round<r>/{samples,scored,sft}.jsonl and its model, OUT_DIR/round<r>/model.
set -euo pipefail

model=$1 prompts=$2 judge=$3 out=$4 rounds=${5:-2}
N=${N:-8} MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32} SFT_STEPS=${SFT_STEPS:-50} LR=${LR:-1e-5}
PRECISION=${PRECISION:-auto} SELECT=${SELECT:-}

for round in $(seq 1 "$rounds"); do
    dir=$out/round$round
    mkdir -p "$dir"
    echo "== round $round of $rounds: $model"
    posttrain sample --model "$model" --data "$prompts" --n "$N" --max-new-tokens "$MAX_NEW_TOKENS" \
        --seed "$round" --precision "$PRECISION" --output "$dir/samples.jsonl"
    # --keep-all: the prompts whose every reply scored alike (all right, say) are kept too.
    posttrain judge --data "$dir/samples.jsonl" --judge "$judge" --keep-all --precision "$PRECISION" \
        --output "$dir/scored.jsonl"
    # shellcheck disable=SC2086  # SELECT holds several options
    posttrain best-of-n --data "$dir/scored.jsonl" --output "$dir/sft.jsonl" $SELECT
    posttrain sft --model "$model" --data "$dir/sft.jsonl" --max-steps "$SFT_STEPS" --lr "$LR" \
        --precision "$PRECISION" --output-dir "$dir/model"
    model=$dir/model
done
echo "== the last round's model: $model"

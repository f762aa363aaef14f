#!/usr/bin/env bash
# The whole path on a tiny model: LoRA on the Math23K sample, then loss before/after and Math23K test accuracy.
# Usage: bash benchmarks/eval_tiny_trained.sh [OUTPUT_DIR]   (needs ../shared beside the project)
set -euo pipefail
shared="$(cd "$(dirname "$0")/../.." && pwd)/shared"
base="$shared/reference/tiny/chatglm2-6b-tiny"
out="${1:-outputs/eval-tiny}"
rm -rf "$out"
chatglm-sft train --model "$base" --data "$shared/data/math23k/train.sample.json" --prompt-field original_text \
    --response-field ans --method lora --lora-r 16 --lora-alpha 32 --learning-rate 1e-2 --max-steps 60 \
    --batch-size 8 --precision fp32 --output "$out/adapter"
for adapter in "" "$out/adapter"; do
    name=$([ -n "$adapter" ] && echo tuned || echo base)
    chatglm-sft eval --task loss --model "$base" ${adapter:+--adapter "$adapter"} \
        --data "$shared/data/math23k/train.sample.json" --prompt-field original_text --answer-field ans \
        --output "$out/loss-$name.json"
    chatglm-sft eval --task math23k --model "$base" ${adapter:+--adapter "$adapter"} \
        --data "$shared/data/math23k/test.json" --max-new-tokens 8 --batch-size 32 --output "$out/math23k-$name.json"
done

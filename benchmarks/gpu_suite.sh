#!/usr/bin/env bash
# The GPU suite, ready for a lent GPU (<= 8 minutes on one H200): ChatGLM2-6B-shape random weights, bf16, LoRA, batch
# 4 x 1024 on alpaca_zh; chatglm-sft against transformers Trainer + PEFT side by side, gradient checkpointing off and
# on, packing; QLoRA peak memory at 1 x 1024; int8 / int4 decoding against bf16; one DPO step. Every section runs
# in its own process (its own peak memory; one that fails is recorded and the others still run). Writes
# OUT/suite.json and OUT/suite.md (see benchmarks/gpu_suite.py); exits 1 if a section failed.
#
#   bash benchmarks/gpu_suite.sh [--shape 6b|tiny] [--device cuda|cpu] [--out DIR]
#   bash benchmarks/gpu_suite.sh --shape tiny --device cpu      # the end-to-end check a test runs on a CPU
#
# The sections run under $PYTHON (default: the `python` on PATH, i.e. an activated environment's).
set -uo pipefail

shape=6b
device=cuda
out=gpu-suite-results
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

here="$(cd "$(dirname "$0")" && pwd)"
suite=("${PYTHON:-python}" "$here/gpu_suite.py" --shape "$shape" --device "$device" --work "$out")
mkdir -p "$out"
rm -f "$out"/section-*.json
"${suite[@]}" --setup || exit 1
failed=0
for section in train-ours train-baseline train-ours-gc train-baseline-gc train-ours-packing qlora decode dpo; do
  start=$SECONDS
  if ! "${suite[@]}" --section "$section" > "$out/$section.log" 2>&1; then
    failed=1
    reason="$(tail -n 1 "$out/$section.log" | tr -d '"\\')"
    printf '{"error": "%s"}\n' "$reason" > "$out/section-$section.json"
  fi
  echo "$section: $((SECONDS - start)) s" >&2
done
"${suite[@]}" --report || exit 1
rm -rf "$out/model"
exit $failed

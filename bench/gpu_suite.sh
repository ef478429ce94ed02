#!/usr/bin/env bash
# Everything measured on a lent GPU machine, in one call: our full-size steps (the recipes' own,
# bf16) at batch 48 and 256 for pretraining and 48 for finetuning, remat off and on, and the
# official code's step beside them (bench/torch_baseline.py, float16 autocast as the official
# trainer runs on a GPU). One JSON line per measurement.
#
#   bash bench/gpu_suite.sh             # on the GPU host
#   bash bench/gpu_suite.sh --dry-run   # any machine: builds and lowers everything, runs nothing
#
# PEAK_TFLOPS is the chip's dense bf16 peak for MFU (989: H100 and H200).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
DRY_RUN=()
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=(--dry-run)
fi

FAILED=0
ours() {  # a failed measurement (out of memory, say) is reported and the others still run
  if ! "$PYTHON" bench/recipe_step.py "$@" --peak-tflops "$PEAK_TFLOPS" "${DRY_RUN[@]}" | tail -n 1
  then
    echo "FAILED: bench/recipe_step.py $*" >&2
    FAILED=1
  fi
}

ours configs/pretrain.py:as-base --batch 48
ours configs/pretrain.py:as-base --batch 48 --config.model.remat=matmuls
ours configs/pretrain.py:as-base --batch 256 --config.model.remat=matmuls
ours configs/finetune.py:as2m --batch 48
ours configs/finetune.py:as2m --batch 48 --config.model.remat=matmuls
"$PYTHON" bench/torch_baseline.py --device cuda --modes train --batches 48 --steps 10 \
  "${DRY_RUN[@]}" || FAILED=1
exit "$FAILED"

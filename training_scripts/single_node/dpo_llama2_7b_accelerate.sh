#!/usr/bin/env bash
# world: 8
# DPO on 1 node x 8 GPUs started by `accelerate launch`; ZeRO settings come from the accelerate config
# (written by `accelerate config`), the reference model is offloaded to CPU while idle.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${MODEL:?set MODEL to the SFT model folder}
DATA=${DATA:-builtin:arith}
accelerate launch --config_file "$HERE/accelerate/gpu_8proc_zero3.yaml" -m ds_realloc dpo \
    model.path="$MODEL" data.train="$DATA" data.eval="${EVAL_DATA:-$DATA}" data.max_seq_len=2048 \
    engine.gradient_checkpointing=true train.batch_size=64 train.micro_batch_size=2 \
    optim.lr=5e-7 dpo.beta=0.1 ref.offload=true output.dir="${OUT:-runs/llama2_7b/dpo}" "$@"

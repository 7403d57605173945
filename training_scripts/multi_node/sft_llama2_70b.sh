#!/usr/bin/env bash
# world: 32
# SFT of a 70B model on 4 nodes x 8 GPUs with the deepspeed launcher (pdsh over ssh):
# ZeRO-3 with the optimizer offloaded to CPU (DeepSpeedCPUAdam).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:?set MODEL to a local HF folder present on every node}
deepspeed --hostfile "${HOSTFILE:-$HERE/hostfile.example}" --module ds_realloc sft \
    model.path="$MODEL" data.train="${DATA:-builtin:arith}" data.max_seq_len=4096 \
    engine.zero_stage=3 engine.dtype=bf16 engine.offload_optimizer=true engine.gradient_checkpointing=true \
    train.batch_size=256 train.micro_batch_size=1 optim.lr=1e-5 \
    output.dir="${OUT:-runs/llama2_70b/sft}" launch.dist_timeout_s=1800 "$@"

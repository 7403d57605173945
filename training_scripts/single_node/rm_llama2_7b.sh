#!/usr/bin/env bash
# world: 8
# Reward model on preference pairs ({"prompt","chosen","rejected"} JSONL), 1 node x 8 GPUs, ZeRO-3.
set -euo pipefail
MODEL=${MODEL:?set MODEL to the SFT model folder}
DATA=${DATA:-builtin:arith}
deepspeed --num_gpus 8 --module ds_realloc rm \
    model.path="$MODEL" data.train="$DATA" data.eval="${EVAL_DATA:-$DATA}" data.max_seq_len=2048 \
    engine.zero_stage=3 engine.dtype=bf16 engine.gradient_checkpointing=true \
    train.batch_size=64 train.micro_batch_size=4 optim.lr=9e-6 \
    output.dir="${OUT:-runs/llama2_7b/rm}" "$@"

#!/usr/bin/env bash
# world: 8
# SFT of a 7B LLaMA-family model on one node with 8 GPUs: ZeRO-3, bf16, gradient checkpointing.
set -euo pipefail
MODEL=${MODEL:?set MODEL to a local HF folder, e.g. /models/Llama-2-7b-hf}
DATA=${DATA:-builtin:arith}
deepspeed --num_gpus 8 --module ds_realloc sft \
    model.path="$MODEL" data.train="$DATA" data.eval="${EVAL_DATA:-$DATA}" data.max_seq_len=2048 \
    engine.zero_stage=3 engine.dtype=bf16 engine.gradient_checkpointing=true \
    train.batch_size=128 train.micro_batch_size=4 train.epochs=2 optim.lr=2e-5 optim.warmup_steps=20 \
    output.dir="${OUT:-runs/llama2_7b/sft}" "$@"

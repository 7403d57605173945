#!/usr/bin/env bash
# world: 8
# GRPO of a 7B LLaMA-family model on one node x 8 GPUs, deepspeed launcher with a hostfile: 16
# prompts x 8 samples a step, generation tensor parallel (d4t2) on all 8 GPUs, training ZeRO-3 on
# all 8. `--dry-run` checks the command line for 8 ranks without starting anything.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:?set MODEL to the SFT model folder}
deepspeed --hostfile "${HOSTFILE:-$HERE/hostfile.8gpu}" --module ds_realloc grpo \
    model.path="$MODEL" data.train="${DATA:-builtin:arith}" \
    engine.zero_stage=3 engine.dtype=bf16 engine.gradient_checkpointing=true \
    train.batch_size=16 train.micro_batch_size=4 rollout.samples_per_prompt=8 rollout.max_new_tokens=512 \
    allocation=d4t2 \
    launch.nprocs=8 output.dir="${OUT:-runs/llama2_7b/grpo}" "$@"

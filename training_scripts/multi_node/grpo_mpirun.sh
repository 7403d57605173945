#!/usr/bin/env bash
# world: 32
# GRPO of a 7B model on 4 nodes x 8 GPUs with mpirun (ranks from MPI; no ssh from the launcher):
# 64 prompts x 8 samples a step, generation tensor parallel within a node (d8t4), training ZeRO-3
# on all 32 GPUs. `--dry-run` checks the command line for 32 ranks without starting anything.
set -euo pipefail
MODEL=${MODEL:?set MODEL to a local HF folder present on every node}
mpirun -np 32 --hostfile "${MPI_HOSTFILE:?an MPI hostfile}" -x PATH -x LD_LIBRARY_PATH \
    python -m ds_realloc grpo model.path="$MODEL" data.train="${DATA:-builtin:arith}" \
    engine.zero_stage=3 engine.dtype=bf16 engine.gradient_checkpointing=true \
    train.batch_size=64 train.micro_batch_size=4 rollout.samples_per_prompt=8 rollout.max_new_tokens=512 \
    allocation=d8t4 launch.nprocs=32 launch.dist_timeout_s=1800 output.dir="${OUT:-runs/mpirun/grpo}" "$@"

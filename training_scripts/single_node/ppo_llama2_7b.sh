#!/usr/bin/env bash
# world: 8
# PPO of a 7B LLaMA-family actor with a critic of the same size on one node x 8 GPUs, deepspeed
# launcher with a hostfile. Generation and inference run tensor parallel (d4t2) on all 8 GPUs,
# reallocated from the trainings' ZeRO-3 partitions; actor and critic train at the same time on
# their own 4 GPUs. `--dry-run` checks the command line for 8 ranks without starting anything.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:?set MODEL to the SFT model folder}
deepspeed --hostfile "${HOSTFILE:-$HERE/hostfile.8gpu}" --module ds_realloc ppo \
    model.path="$MODEL" critic.path="${CRITIC:-}" data.train="${DATA:-builtin:arith}" \
    engine.zero_stage=3 engine.dtype=bf16 engine.gradient_checkpointing=true \
    train.batch_size=64 train.micro_batch_size=4 rollout.max_new_tokens=256 \
    allocations.actor_gen.strategy=d4t2 allocations.ref_inf.strategy=d4t2 allocations.critic_inf.strategy=d4t2 \
    allocations.actor_train.mesh=0-3 allocations.critic_train.mesh=4-7 \
    launch.nprocs=8 output.dir="${OUT:-runs/llama2_7b/ppo}" "$@"

#!/usr/bin/env bash
# world: 2
# SFT, then a reward model, then DPO on the embedded SmolLM2-135M-Instruct and the built-in
# arithmetic task, 2 CPU processes each (ds-realloc starts them itself). A few minutes per command.
set -euo pipefail
OUT=${OUT:-runs/cpu_demo}
ds-realloc sft output.dir="$OUT/sft" "$@"
ds-realloc rm output.dir="$OUT/rm" "$@"
ds-realloc dpo model.path="$OUT/sft/hf/actor" output.dir="$OUT/dpo" "$@"

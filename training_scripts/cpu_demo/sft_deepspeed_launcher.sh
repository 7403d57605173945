#!/usr/bin/env bash
# world: 2
# The same SFT job started by the deepspeed launcher with a hostfile (local machine, 2 slots).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
deepspeed --hostfile "$HERE/hostfile.localhost" --no_ssh_check --master_addr 127.0.0.1 \
    --module ds_realloc sft output.dir="${OUT:-runs/cpu_demo/sft_ds}" "$@"

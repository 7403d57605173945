#!/usr/bin/env bash
# world: 32
# The same job with mpirun: ranks are discovered through mpi4py (no ssh from the launcher).
set -euo pipefail
MODEL=${MODEL:?set MODEL to a local HF folder present on every node}
mpirun -np "${NP:-32}" --hostfile "${MPI_HOSTFILE:?an MPI hostfile}" -x PATH -x LD_LIBRARY_PATH \
    python -m ds_realloc sft model.path="$MODEL" engine.dtype=bf16 engine.offload_optimizer=true \
    train.batch_size=256 train.micro_batch_size=4 \
    output.dir="${OUT:-runs/mpirun/sft}" "$@"

"""ds_realloc's kernels, built like DeepSpeed's ops: builders in `op_builder.builder`, sources in
`op_builder/csrc/{cpu,cuda}/`. The package has no `__deepspeed__` marker, so DeepSpeed never
mistakes it for its own top-level `op_builder`. Use the kernels through `ds_realloc.ops`."""

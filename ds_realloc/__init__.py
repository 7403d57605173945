"""ds_realloc: RLHF on DeepSpeed ZeRO with parameter reallocation between per-call layouts."""

__version__ = "0.1.0"

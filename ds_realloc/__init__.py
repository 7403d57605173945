"""ds_realloc: RLHF on DeepSpeed ZeRO with parameter reallocation between per-call layouts."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`ds_realloc.initialize`: `deepspeed.initialize` with a reallocating hybrid engine (imported on use)."""
    if name == "initialize":
        from ds_realloc.engine.initialize import initialize

        return initialize
    raise AttributeError(f"module 'ds_realloc' has no attribute '{name}'")

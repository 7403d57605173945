"""`ds_realloc.initialize`: `deepspeed.initialize`, with DeepSpeed's hybrid engine replaced by reallocation.

A DeepSpeed-Chat user changes one line (`deepspeed.initialize` -> `ds_realloc.initialize`). With the
config's `hybrid_engine` section absent or disabled it *is* `deepspeed.initialize`. Enabled, the
section is taken out, DeepSpeed builds its ordinary engine (ZeRO 0-3, offload and checkpoints as
always), and that engine gains DeepSpeed's hybrid-engine surface: `generate(input_ids,
attention_mask, **hf_keywords)`, also installed as `engine.module.generate`, returning what HF
`generate` returns for the caller's batch. Each call places the live partitions into a
`d{world/tp}t{tp}` layout on the engine's ranks (`HybridEngine.placed`, the object the runner's roles
use); the ranks of a tensor-parallel group generate their prompts together and each gets its own
rows back, padded as HF pads them.

Section keys (DeepSpeed 0.19's, validated by DeepSpeed's own schema, so an unknown key is an error
naming it): `inference_tp_size`; `release_inference_cache` (true: free the inference copy after each
`generate`; false: keep it until the next optimizer step); `max_out_tokens` (prompt width + new
tokens, at most); `pin_parameters` and `tp_gather_partition_size` (DeepSpeed's ZeRO-3 gathering
knobs: nothing is gathered here, said once); `enable_cuda_graph` (on CUDA each `generate` captures
its decode step once as a CUDA graph and replays it, `models/generate.py`; elsewhere no effect, said
once).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ds_realloc.engine.hybrid import HybridEngine
from ds_realloc.layout.mesh import Strategy
from ds_realloc.models.generate import GenerationConfig, generate
from ds_realloc.utils.errors import ConfigError, ModelError
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)

# HF `generate` keywords the hybrid engine's generate takes (besides input_ids / attention_mask)
GENERATE_KEYWORDS = ("max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                     "eos_token_id", "pad_token_id", "synced_gpus")
_NO_MEANING = {"pin_parameters": "nothing is gathered: partitions are reallocated in place",
               "tp_gather_partition_size": "nothing is gathered: partitions are reallocated in place"}


@dataclass(frozen=True)
class HybridSettings:
    tp: int
    release_inference_cache: bool
    max_out_tokens: int
    cuda_graph: bool = False


def _config_dict(args, config, config_params) -> tuple[dict | None, str]:
    """The DeepSpeed config as DeepSpeed finds it (`config`, `config_params`, `args.deepspeed_config`)."""
    config = config if config is not None else config_params
    if config is None and getattr(args, "deepspeed_config", None) is not None:
        config = args.deepspeed_config
    if config is None or isinstance(config, dict):
        return config, "the DeepSpeed config"
    import hjson

    try:
        return hjson.loads(Path(config).read_text()), str(config)
    except (OSError, hjson.HjsonDecodeError) as e:
        raise ConfigError(f"cannot read the DeepSpeed config {config}: {e}") from None


def hybrid_settings(section: dict, where: str) -> HybridSettings:
    """The `hybrid_engine` section, checked by the installed DeepSpeed's own schema."""
    import pydantic
    from deepspeed.runtime.config import HybridEngineConfig

    try:
        parsed = HybridEngineConfig(**section)
    except pydantic.ValidationError as e:
        problems = "; ".join(f"hybrid_engine.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where}: {problems}") from None
    for key in sorted(set(section) & set(_NO_MEANING)):
        logger.info("hybrid_engine.%s is accepted and has no effect in ds_realloc (%s)", key, _NO_MEANING[key])
    if parsed.inference_tp_size < 1:
        raise ConfigError(f"{where}: hybrid_engine.inference_tp_size must be at least 1")
    return HybridSettings(parsed.inference_tp_size, parsed.release_inference_cache, parsed.max_out_tokens,
                          parsed.enable_cuda_graph)


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               distributed_port: int = 29500, mpu=None, dist_init_required=None, collate_fn=None, config=None,
               mesh_param=None, config_params=None):
    """`deepspeed.initialize`'s signature and return values: (engine, optimizer, dataloader, lr_scheduler)."""
    import deepspeed

    arguments = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                     training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=distributed_port,
                     mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                     mesh_param=mesh_param, config_params=config_params)
    ds_config, where = _config_dict(args, config, config_params)
    section = (ds_config or {}).get("hybrid_engine") or {}
    if not section.get("enabled", False):
        return deepspeed.initialize(**arguments)
    settings = hybrid_settings(section, where)
    _check_no_adapters(model)
    without = {k: v for k, v in ds_config.items() if k != "hybrid_engine"}
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None
    engine, *rest = deepspeed.initialize(**{**arguments, "args": args, "config": without, "config_params": None})
    engine.__class__ = _with_hybrid_surface(type(engine))
    engine._hybrid_setup(settings)
    return (engine, *rest)


def _check_no_adapters(model) -> None:
    names = [name for name, _ in model.named_parameters() if "lora_" in name] if model is not None else []
    if names:
        raise ModelError(f"the model has LoRA adapters ({names[0]}, ...): merge them into the weights before "
                         f"ds_realloc.initialize (peft: model = model.merge_and_unload()); generation with unmerged "
                         f"adapters is not supported")


_SURFACES: dict[type, type] = {}


def _with_hybrid_surface(engine_class: type) -> type:
    """`engine_class` (DeepSpeed's engine class) with the hybrid-engine methods added."""
    if engine_class not in _SURFACES:
        _SURFACES[engine_class] = type(f"Realloc{engine_class.__name__}", (HybridSurface, engine_class), {})
    return _SURFACES[engine_class]


class HybridSurface:
    """DeepSpeed's hybrid-engine methods on a DeepSpeed engine (mixed into its class)."""

    def _hybrid_setup(self, settings: HybridSettings) -> None:
        self.hybrid_settings = settings
        self.realloc = HybridEngine.of_engine(self, self.module.config, value_head=False)
        world = self.realloc.src.mesh.size
        if world % settings.tp:
            raise ConfigError(f"hybrid_engine.inference_tp_size={settings.tp} does not divide the engine's "
                              f"{world} data-parallel ranks")
        self.inference_layout = self.realloc.layout(self.realloc.src.mesh, Strategy(dp=world // settings.tp,
                                                                                     tp=settings.tp))
        self.module.generate = self.generate  # how DeepSpeed-Chat's trainer calls it, as with DeepSpeed's engine

    def step(self, *args, **kwargs):
        before = self.global_steps
        result = super().step(*args, **kwargs)
        if self.global_steps != before:
            self.realloc.release()  # a kept inference copy never survives an optimizer step
        return result

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """HF `generate`'s result for this rank's batch: the prompts as passed, then the new tokens (pad
        after EOS; as long as this batch's longest completion). Every rank of the engine calls it."""
        unknown = sorted(set(kwargs) - set(GENERATE_KEYWORDS))
        if unknown:
            raise ConfigError(f"generate: keyword '{unknown[0]}' is not supported; supported: "
                              f"{', '.join(GENERATE_KEYWORDS)}")
        ids = input_ids.cpu()
        cfg, eos, pad = _generation_request(self.module, ids.shape[1], kwargs)
        if ids.shape[1] + cfg.max_new_tokens > self.hybrid_settings.max_out_tokens:
            raise ConfigError(f"generate: prompt width {ids.shape[1]} + max_new_tokens {cfg.max_new_tokens} exceeds "
                              f"hybrid_engine.max_out_tokens={self.hybrid_settings.max_out_tokens}")
        mask = (attention_mask.cpu() if attention_mask is not None else _inferred_mask(ids, pad, eos)).bool()
        prompts = [row[keep].tolist() for row, keep in zip(ids, mask)]
        keep = None if self.hybrid_settings.release_inference_cache else self.global_steps
        with self.realloc.placed(self.inference_layout, keep) as placement:
            everyone = _group_prompts(prompts, placement.group)
            out = generate(placement.model, [p for mine in everyone for p in mine],
                           dataclasses.replace(cfg, cuda_graph=self.hybrid_settings.cuda_graph), eos, pad)
        first = sum(len(mine) for mine in everyone[:placement.group.index(dist.get_rank())])
        tokens, lengths = out.tokens[first:first + len(prompts)], out.lengths[first:first + len(prompts)]
        return torch.cat([ids, tokens[:, :int(lengths.max())]], 1).to(input_ids.device)


def _group_prompts(prompts: list[list[int]], group: Sequence[int]) -> list[list[list[int]]]:
    """Every tensor-parallel rank's prompts, in tensor-parallel order."""
    if len(group) == 1:
        return [prompts]
    from ds_realloc.utils.dist import group_of

    gathered: list[Any] = [None] * len(group)
    dist.all_gather_object(gathered, (dist.get_rank(), prompts), group=group_of(list(group)))
    by_rank = dict(gathered)
    return [by_rank[rank] for rank in group]


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value.tolist() if torch.is_tensor(value) else
                                  value if isinstance(value, (list, tuple)) else [value]))


def _generation_request(module, width: int, kwargs: dict) -> tuple[GenerationConfig, tuple[int, ...], int]:
    """Our generation settings from HF keywords, defaulting like HF (the model's generation_config)."""
    defaults = getattr(module, "generation_config", None)

    def get(name, fallback=None):
        value = kwargs.get(name)
        if value is None and defaults is not None:
            value = getattr(defaults, name, None)
        return fallback if value is None else value

    if kwargs.get("max_new_tokens") is not None:
        new_tokens = int(kwargs["max_new_tokens"])
    elif kwargs.get("max_length") is not None:
        new_tokens = int(kwargs["max_length"]) - width
    else:
        new_tokens = int(get("max_new_tokens") or (get("max_length", 20) - width))
    if new_tokens < 1:
        raise ConfigError(f"generate: max_length / max_new_tokens leaves no new token after a prompt of width {width}")
    eos = _ids(get("eos_token_id", getattr(module.config, "eos_token_id", None)))
    pad = get("pad_token_id", getattr(module.config, "pad_token_id", None))
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)
    sampling = bool(get("do_sample", False))
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=min(int(get("min_new_tokens", 0)), new_tokens),
                           greedy=not sampling, temperature=float(get("temperature", 1.0)) if sampling else 1.0,
                           top_k=int(get("top_k", 0)) if sampling else 0,
                           top_p=float(get("top_p", 1.0)) if sampling else 1.0)
    cfg.validate()
    return cfg, eos, pad


def _inferred_mask(ids: torch.Tensor, pad: int, eos: tuple[int, ...]) -> torch.Tensor:
    """HF's rule without an attention mask: pads are masked when the pad token is not EOS."""
    if pad not in eos and bool((ids == pad).any()):
        return ids != pad
    return torch.ones_like(ids, dtype=torch.bool)


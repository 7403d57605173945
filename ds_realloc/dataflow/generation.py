"""`ds-realloc generate`: batched generation on a d x t layout, each rank reading only its tensor
shard from the checkpoint; prompts are split between the data-parallel groups."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer

from ds_realloc.data.datasets import ChatFormatter, load_records, tokenize_records
from ds_realloc.engine.ds_config import auto_dtype
from ds_realloc.layout.layout import Layout
from ds_realloc.layout.mesh import DeviceMesh, Strategy
from ds_realloc.layout.model import model_spec
from ds_realloc.models.generate import GenerationConfig, completion_ids, generate, sampling_of
from ds_realloc.models.inference import inference_model, parallel_groups
from ds_realloc.models.presets import EMBEDDED_DEFAULT, resolve_model_path
from ds_realloc.models.registry import family_of
from ds_realloc.models.hf_io import CheckpointReader
from ds_realloc.models.shards import load_shards
from ds_realloc.utils.config import invalid, option
from ds_realloc.utils.dist import comm_device, init_distributed
from ds_realloc.utils.errors import ConfigError
from ds_realloc.utils.logging import get_logger, setup_logging

logger = get_logger(__name__)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class GenerateConfig(GenerationConfig):
    model: str = option(EMBEDDED_DEFAULT, "an HF model folder or a preset")
    prompts: str = option("builtin:arith", "a JSONL file of {\"prompt\", \"answer\"?} records, or builtin:<task> "
                                           "(its held-out prompts)")
    out: str = option("runs/generate/completions.jsonl", "output JSONL: prompt, completion, token_ids per line")
    tp: int = option(1, "tensor-parallel degree; the processes form nprocs / tp data-parallel groups")
    batch_size: int = option(16, "prompts per generate call of a data-parallel group")
    chat_template: bool = option(True, "format prompts with the tokenizer's chat template")
    max_prompt_len: int = option(1024, "longest prompt in tokens")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "auto = bf16 where the GPU or CPU computes it natively, else fp32")
    nprocs: int = option(0, "processes when not under a launcher (0 = one per GPU, or 2 on CPU)")
    dist_timeout_s: float = option(600.0, "seconds a rank waits in a collective before the job fails")

    def validate(self) -> None:
        super().validate()
        for name in ("tp", "batch_size", "max_prompt_len"):
            if getattr(self, name) < 1:
                raise invalid(name, "must be at least 1")

    def resolved_nprocs(self) -> int:
        if self.nprocs:
            return self.nprocs
        return torch.cuda.device_count() if torch.cuda.is_available() else 2


def generation_layout(tp: int, world: int, config) -> Layout:
    """The d x t layout of `world` ranks for the model's HF config; a ConfigError when it cannot take it
    (checked by the launching process too, before any rank starts)."""
    if world % tp:
        raise ConfigError(f"tp={tp} does not divide the {world} processes")
    layout = Layout(model_spec(config), DeviceMesh(tuple(range(world))), Strategy(dp=world // tp, tp=tp), fused=True)
    layout.buffers(0)  # every rank's shards exist: the heads split tp ways
    return layout


def run_generate(cfg: GenerateConfig) -> dict:
    """Generate a completion for every prompt and write them, in prompt order, from rank 0."""
    rank, world = init_distributed(cfg.dist_timeout_s)
    setup_logging(rank)
    path = resolve_model_path(cfg.model, field="model")
    config = AutoConfig.from_pretrained(path)
    layout = generation_layout(cfg.tp, world, config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    samples = tokenize_records(load_records(cfg.prompts, "eval", "prompts"), "prompts",
                               ChatFormatter(tokenizer, cfg.chat_template), cfg.max_prompt_len)
    dp, tp_rank, pp = layout.coords(rank)
    dtype = TORCH_DTYPES[auto_dtype() if cfg.dtype == "auto" else cfg.dtype]
    prefix = "transformer" if family_of(config).name == "gpt2" else "model"
    reader = CheckpointReader(path)
    weights = load_shards(path, layout, rank, dtype, comm_device(), prefix, reader)
    stored = sum(torch.Size(reader.shape(name)).numel() for name in reader.names())
    logger.info("rank %d read %.1f%% of the checkpoint's elements (its tp=%d shard)", rank,
                100 * reader.elements_read / stored, cfg.tp)
    model = inference_model(config, weights, *parallel_groups(layout, rank))
    eos = sorted({tokenizer.eos_token_id, *([config.eos_token_id] if isinstance(config.eos_token_id, int)
                                            else config.eos_token_id or [])})
    mine = list(range(dp, len(samples), layout.strategy.dp))
    sampling = sampling_of(cfg)
    sampling.seed = cfg.seed + dp
    results, generated, start = [], 0, time.perf_counter()
    for first in range(0, len(mine), cfg.batch_size):
        chunk = mine[first:first + cfg.batch_size]
        out = generate(model, [samples[i].prompt_ids for i in chunk], sampling, eos, tokenizer.pad_token_id)
        for row, index in enumerate(chunk):
            results.append((index, completion_ids(out, row)))
        generated += int(out.mask.sum())
    elapsed = time.perf_counter() - start
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (results if tp_rank == 0 else [], generated if tp_rank == 0 else 0))
    summary = {"prompts": len(samples), "generated_tokens": sum(g[1] for g in gathered), "seconds": elapsed}
    summary["tokens_per_s"] = summary["generated_tokens"] / max(elapsed, 1e-9)
    if rank == 0:
        completions = dict(pair for part, _ in gathered for pair in part)
        out_path = Path(cfg.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("w", encoding="utf-8") as handle:
            for index, sample in enumerate(samples):
                ids = completions[index]
                line = {"prompt": sample.prompt, "completion": tokenizer.decode(ids, skip_special_tokens=True),
                        "token_ids": ids}
                if sample.answer is not None:
                    line["answer"] = sample.answer
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        logger.info("wrote %d completions to %s (%d tokens, %.1f tokens/s on %s)", len(samples), out_path,
                    summary["generated_tokens"], summary["tokens_per_s"], layout.strategy)
    return summary

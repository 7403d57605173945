"""Generation from a ZeRO-3 model: ours against the ways DeepSpeed users generate from ZeRO-3.

`ds-realloc bench generate`: the same model, prompts, batch and lengths, each row in fresh processes
of one run. Baselines (ZeRO-3 partitions in, tokens out, like ours):
(a) `zero3_hf_generate`, HF `generate` on the DeepSpeed ZeRO-3 engine (`synced_gpus`; every layer's
parameters all-gathered at every decoding step: what users get without a hybrid engine);
(b) `zero3_gather_once_hf_generate`, `GatheredParameters` over the whole model once, then HF
`generate` on the gathered model (DeepSpeed's hybrid engine outside its TP path; TRL's
`unwrap_model_for_generation(ds3_gather_for_generation=True)`; `engine.zero_inference`).
Ours: (c) `ours_d2`, the hybrid engine reallocating zero3:d<n> -> d<n> (each rank a replica with its
share of the prompts); (d) `ours_t2`, -> t<n> (all prompts on one tensor-parallel group).
Reference, not a baseline (it needs the whole model resident on every rank, not ZeRO-3):
(e) `replicated_hf_generate`, HF `generate` on a plain replica per rank.
Mixture-of-experts models add (g) `ours_e2`, -> d<n>e<n> (expert parallel: each rank its share of
the prompts and 1/n of every layer's experts, tokens exchanged all-to-all with the ranks holding
theirs). The drop-in API: (f) `initialize_t2`, `ds_realloc.initialize` with `hybrid_engine` enabled
(`inference_tp_size` n) and `engine.module.generate(...)` as DeepSpeed-Chat calls it, each rank
passing its share of the prompts; `initialize_vs_ours_t2` is its tokens/s over (d)'s. With
`repeats` > 1 the rows run that many times, interleaved, and each row reports its median run.
Tokens per second count gathering / reallocation too (min = max new tokens, so every row generates
the same tokens), after one untimed 2-token warm-up of the same path; peak memory comes from one more
call, after the timed one (its RSS sampling and returned memory would slow the timed call). The
headline ratio is ours' best against the best ZeRO-3 baseline.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ds_realloc.bench import bench_main, headline
from ds_realloc.utils.config import invalid, option


@dataclass
class GenerateBenchConfig:
    model: str = option("llama-100m", "a preset or HF folder")
    nprocs: int = option(2, "processes (the d / t degree of ours)")
    batch_size: int = option(16, "prompts in the batch (split between data-parallel ranks)")
    new_tokens: int = option(64, "tokens generated per prompt")
    min_prompt_len: int = option(16, "shortest prompt (lengths vary between this and max_prompt_len)")
    max_prompt_len: int = option(48, "longest prompt")
    dtype: Literal["fp32", "bf16"] = option("fp32", "parameter dtype")
    rows: str = option("", "comma-separated rows to run ('' = all)")
    repeats: int = option(1, "runs of every row, interleaved; each row reports its median run")
    cuda_graph: bool = option(False, "ours decode with CUDA graphs (on CUDA; no effect elsewhere)")
    timeout_s: float = option(1800.0, "give up after this many seconds")

    def validate(self) -> None:
        if self.batch_size % self.nprocs:
            raise invalid("batch_size", f"must be divisible by nprocs={self.nprocs}")
        if not 1 <= self.min_prompt_len <= self.max_prompt_len:
            raise invalid("min_prompt_len", "must be within [1, max_prompt_len]")
        unknown = [row for row in self.selected() if row not in ROWS]
        if unknown:
            raise invalid("rows", f"'{unknown[0]}' is not a row; rows: {', '.join(ROWS)}")
        if self.repeats < 1:
            raise invalid("repeats", "must be at least 1")

    def selected(self) -> tuple[str, ...]:
        return tuple(r.strip() for r in self.rows.split(",") if r.strip()) or ROWS


BASELINES = {"zero3_hf_generate": "DeepSpeed ZeRO-3 engine + HF generate(synced_gpus=True)",
             "zero3_gather_once_hf_generate": "GatheredParameters(whole model) + HF generate (DeepSpeed hybrid "
                                              "engine without TP; TRL ds3_gather_for_generation)"}
OURS = ("ours_d2", "ours_t2", "ours_e2")
REFERENCE = "replicated_hf_generate"
API = "initialize_t2"
ROWS = (*BASELINES, *OURS, REFERENCE, API)


def _prompts(cfg: GenerateBenchConfig, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    span = cfg.max_prompt_len - cfg.min_prompt_len + 1
    lengths = [cfg.min_prompt_len + (i * 7) % span for i in range(cfg.batch_size)]
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def _bench_rank(rank: int, world: int, cfg_dict: dict, row: str) -> dict:
    import torch.distributed as dist
    from transformers import AutoConfig

    from ds_realloc.engine.config import EngineConfig, OptimConfig
    from ds_realloc.engine.ds_config import BatchGeometry, frozen_ds_config, torch_dtype, train_ds_config
    from ds_realloc.engine.factory import build_frozen_model
    from ds_realloc.engine.hybrid import HybridEngine
    from ds_realloc.engine.zero_inference import ZeroInferenceCall, hf_generate
    from ds_realloc.layout.mesh import DeviceMesh, Strategy
    from ds_realloc.models.generate import GenerationConfig, generate, left_padded
    from ds_realloc.models.presets import resolve_model_path
    from ds_realloc.utils.memory import PeakMemory, return_freed_memory

    cfg = GenerateBenchConfig(**cfg_dict)
    path = resolve_model_path(cfg.model, field="model")
    hf_config = AutoConfig.from_pretrained(path)
    train = train_ds_config(EngineConfig(zero_stage=3, dtype=cfg.dtype), OptimConfig(), BatchGeometry(1, 1, world), 1)
    frozen = build_frozen_model(path, "lm", frozen_ds_config(train, offload=False), offload=False) if row != API \
        else None
    prompts = _prompts(cfg, hf_config.vocab_size)
    pad = hf_config.pad_token_id
    mesh = DeviceMesh(tuple(range(world)))
    replica = None
    if row == REFERENCE:
        from transformers import AutoModelForCausalLM

        replica = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(train)).eval()
    hybrid = HybridEngine(frozen.module, hf_config, False, mesh, torch_dtype(train)) if frozen is not None else None
    api = _api_engine(path, train, world) if row == API else None

    def run(new_tokens: int) -> tuple[int, float]:
        """The row's whole path from ZeRO-3 partitions to tokens; returns how many this rank reports
        and the reallocation time."""
        greedy = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, greedy=True,
                                  cuda_graph=cfg.cuda_graph)
        mine = prompts[rank::world]
        with torch.no_grad():
            if row == "zero3_hf_generate":
                out = hf_generate(frozen.module, mine, greedy, [pad], pad, synced_gpus=True)
            elif row == "zero3_gather_once_hf_generate":
                out = ZeroInferenceCall(frozen.module, frozen._engine).generate(mine, greedy, [pad], pad)
            elif row == REFERENCE:
                out = hf_generate(replica, mine, greedy, [pad], pad)
            elif row == API:
                ids, mask = left_padded(mine, pad)
                out = api.module.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                          eos_token_id=pad)
                return out[:, ids.shape[1]:].numel(), 0.0
            else:
                strategy = {"ours_d2": Strategy(dp=world), "ours_t2": Strategy(tp=world),
                            "ours_e2": Strategy(dp=world, ep=world)}[row]
                own = row != "ours_t2"  # each rank generates its own prompts
                with hybrid.placed(hybrid.layout(mesh, strategy)) as placement:  # not kept: moved on every call
                    out = generate(placement.model, mine if own else prompts, greedy, [pad], pad)
                    return (int(out.mask.sum()) if own or rank == 0 else 0), placement.seconds
        return int(out.mask.sum()), 0.0

    run(2)  # warm-up, not timed: first-call costs (allocator, thread pools, plan building) leave every row alike
    dist.barrier()
    start = time.perf_counter()
    tokens, realloc_s = run(cfg.new_tokens)
    dist.barrier()
    elapsed = time.perf_counter() - start
    return_freed_memory()  # then the same call again, for its peak memory only
    with PeakMemory() as memory:
        run(cfg.new_tokens)
    return {"tokens": tokens, "seconds": elapsed, "peak_mem_bytes": memory.bytes, "realloc_s": realloc_s}


def run_generate_bench(cfg: GenerateBenchConfig) -> dict:
    from transformers import AutoConfig

    from ds_realloc.models.presets import resolve_model_path
    from ds_realloc.models.published import COUNT_KEYS
    from ds_realloc.utils.spawn import run_ranks

    report: dict = {"model": cfg.model, "nprocs": cfg.nprocs, "batch_size": cfg.batch_size,
                    "new_tokens": cfg.new_tokens, "dtype": cfg.dtype, "cuda_graph": cfg.cuda_graph}
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model, field="model"))
    skipped = {row: f"the model's heads do not split {cfg.nprocs} ways" for row in ("ours_t2", API)
               if not _tp_fits(cfg, config)}
    experts = next((getattr(config, key) for key in COUNT_KEYS if getattr(config, key, None)), 0)
    if not experts or experts % cfg.nprocs:
        skipped["ours_e2"] = (f"{experts} experts do not split {cfg.nprocs} ways" if experts else
                              "not a mixture-of-experts model")
    rows = [row for row in cfg.selected() if row not in skipped]
    for row in set(skipped) & set(cfg.selected()):
        report[row] = {"skipped": skipped[row]}
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(cfg.repeats):  # interleaved: machine drift hits every row alike
        for row in rows:
            results = run_ranks(_bench_rank, cfg.nprocs, asdict(cfg), row, timeout=cfg.timeout_s)
            seconds = max(r["seconds"] for r in results)
            tokens = sum(r["tokens"] for r in results)
            runs[row].append({"tokens_per_s": tokens / seconds, "seconds": seconds, "generated_tokens": tokens,
                              "peak_mem_bytes": max(r["peak_mem_bytes"] for r in results),
                              "realloc_s": max(r["realloc_s"] for r in results)})
    for row, measured in runs.items():
        report[row] = sorted(measured, key=lambda m: m["seconds"])[len(measured) // 2]  # the median run
        if cfg.repeats > 1:
            report[row]["tokens_per_s_runs"] = [m["tokens_per_s"] for m in measured]
    if API in runs and "ours_t2" in runs:
        report["initialize_vs_ours_t2"] = report[API]["tokens_per_s"] / report["ours_t2"]["tokens_per_s"]
    if not set(BASELINES) <= set(runs) or not set(OURS) & set(runs):
        return report  # a subset of rows: no headline
    baseline = report["zero3_hf_generate"]["tokens_per_s"]
    ours = tuple(row for row in OURS if row in rows)
    for row in ours:
        report[f"speedup_{row.removeprefix('ours_')}"] = report[row]["tokens_per_s"] / baseline
    report["baselines"] = BASELINES
    report["reference"] = {REFERENCE: "HF generate on a whole replica per rank (not ZeRO-3: not a baseline)"}
    return {**report, **headline(report, ours, tuple(BASELINES), "tokens_per_s")}


def _api_engine(path, train_config: dict, world: int):
    """A DeepSpeed-Chat-style actor: a ZeRO-3 training engine from `ds_realloc.initialize`."""
    from transformers import AutoModelForCausalLM

    import ds_realloc
    from ds_realloc.engine.ds_config import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(train_config))
    # the copy is freed after each call, as after each training step in RLHF: every call reallocates, like ours_t2
    config = {**train_config, "hybrid_engine": {"enabled": True, "inference_tp_size": world, "max_out_tokens": 4096,
                                                "release_inference_cache": True}}
    engine, *_ = ds_realloc.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _tp_fits(cfg: GenerateBenchConfig, config) -> bool:
    from ds_realloc.dataflow.generation import generation_layout
    from ds_realloc.utils.errors import ConfigError

    try:
        generation_layout(cfg.nprocs, cfg.nprocs, config)
    except ConfigError:
        return False
    return True


def format_report(report: dict) -> str:
    lines = [f"generation, {report['model']}, batch {report['batch_size']}, {report['new_tokens']} new tokens, "
             f"{report['nprocs']} processes, {report['dtype']}"]
    for row in ROWS:
        if row not in report:
            continue
        r = report[row]
        if "skipped" in r:
            lines.append(f"  {row:<18} skipped: {r['skipped']}")
            continue
        lines.append(f"  {row:<18} {r['tokens_per_s']:8.1f} tokens/s  {r['seconds']:7.2f} s  peak "
                     f"{r['peak_mem_bytes'] / 2**20:8.1f} MiB  realloc {r['realloc_s']:.3f} s")
    if "initialize_vs_ours_t2" in report:
        lines.append(f"  {API} vs ours_t2: {report['initialize_vs_ours_t2']:.3f}x tokens/s")
    if "best" in report:
        lines.append(f"  {report['best']} vs the best baseline {report['best_baseline']}: "
                     f"{report['speedup_vs_best']:.2f}x tokens/s, peak memory ratio {report['mem_ratio_vs_best']:.2f}")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    return bench_main(args, GenerateBenchConfig, run_generate_bench, format_report)


CONFIG = GenerateBenchConfig

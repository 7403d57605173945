"""The config tree every training command shares; commands add their own groups (e.g. `dpo`, `ref`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_realloc.dataflow.allocation import AllocationConfig
from ds_realloc.engine.config import EngineConfig, OptimConfig
from ds_realloc.models.presets import EMBEDDED_DEFAULT
from ds_realloc.utils.config import invalid, option


@dataclass
class ModelConfig:
    path: str = option(EMBEDDED_DEFAULT, "an HF model folder, or a preset: smollm2-135m-instruct, tiny-llama, "
                                         "tiny-qwen2, tiny-mistral, tiny-gpt2, tiny-opt, tiny-mixtral, tiny-qwen3-moe, "
                                         "smollm2-moe (SmolLM2 upcycled to 4 experts, top-2)")


@dataclass
class DataConfig:
    train: str = option("builtin:arith", "training data: a JSONL file or builtin:<task> (its training split)")
    eval: str = option("builtin:arith", "held-out data: a JSONL file, builtin:<task> (its held-out split), "
                                        "or '' for none")
    max_seq_len: int = option(512, "longest sample in tokens (prompt + answer); longer ones are errors")
    max_prompt_len: int = option(256, "longest prompt in tokens (prompt datasets of RL commands)")
    chat_template: bool = option(True, "format prompts with the tokenizer's chat template")
    skip_bad_samples: bool = option(False, "skip malformed, incomplete or over-long records (counted and logged) "
                                           "instead of stopping")

    def validate(self) -> None:
        if self.max_seq_len < 2:
            raise invalid("max_seq_len", f"must be at least 2, got {self.max_seq_len}")


@dataclass
class TrainConfig:
    batch_size: int = option(16, "samples (sequences, or pairs for rm/dpo) per optimizer step, over all ranks")
    micro_batch_size: int = option(4, "samples per rank per forward pass; batch_size / (micro_batch_size x "
                                      "data-parallel ranks) is the number of gradient-accumulation steps")
    epochs: int = option(1, "passes over the training data (when max_steps is 0)")
    max_steps: int = option(0, "optimizer steps to run; 0 = epochs x steps per epoch")
    eval_every: int = option(0, "evaluate every N steps (0 = only before and after training)")
    save_every: int = option(0, "write a resumable DeepSpeed checkpoint every N steps (0 = only at the end)")
    seed: int = option(1, "seed of the data order and of sampling")

    def validate(self) -> None:
        for name in ("batch_size", "micro_batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise invalid(name, f"must be >= 0, got {getattr(self, name)}")


@dataclass
class OutputConfig:
    dir: str = option("", "the run folder (metrics.jsonl, tensorboard/, checkpoints/, hf/); default runs/<command>")
    save_hf: bool = option(True, "write an HF checkpoint folder of every trained model at the end")
    resume: bool = option(False, "continue the run in output.dir from its latest DeepSpeed checkpoint (--resume)")


@dataclass
class LaunchConfig:
    nprocs: int = option(0, "processes to start when the command is not run under a launcher "
                            "(0 = one per GPU, or 2 on a CPU-only machine)")
    dist_timeout_s: float = option(600.0, "seconds a rank waits in a collective before the job fails")
    hostfile: str = option("", "hostfile (<host> slots=<n> lines) giving the slots per host for meshes like "
                               "node1:0-3 ('' = the launcher's local world size)")

    def resolved_nprocs(self) -> int:
        if self.nprocs:
            return self.nprocs
        return torch.cuda.device_count() if torch.cuda.is_available() else 2

    def validate(self) -> None:
        if self.nprocs < 0:
            raise invalid("nprocs", f"must be >= 0, got {self.nprocs}")
        if self.dist_timeout_s <= 0:
            raise invalid("dist_timeout_s", f"must be positive, got {self.dist_timeout_s}")


@dataclass
class RefConfig:
    path: str = option("", "the reference model; '' = the same weights as model.path")
    offload: bool = option(True, "keep the reference model's weights on CPU while it is not computing")
    ema: float = option(0.0, "after every step, ref = ema x actor + (1 - ema) x ref, moved from the actor's "
                             "partitions by reallocation (0 = a fixed reference)")

    def validate(self) -> None:
        if not 0.0 <= self.ema <= 1.0:
            raise invalid("ema", f"must be in [0, 1], got {self.ema}")


@dataclass
class RunConfig:
    """Fields shared by every training command."""

    model: ModelConfig = option(ModelConfig(), "the trained model")
    allocation: str = option("", "one d<dp>t<tp> strategy for every generate / inference call, on all ranks "
                                 "('' = one replica per rank); auto = the planner chooses every allocation not set "
                                 "in allocations.<mfc> at start-up, with this machine's device profile")
    allocations: dict[str, AllocationConfig] = option({}, "per model function call: {mesh, strategy} (training "
                                                          "calls also zero_stage, micro_batch_size), e.g. "
                                                          "allocations.actor_gen.strategy=d1t2")
    data: DataConfig = option(DataConfig(), "datasets")
    engine: EngineConfig = option(EngineConfig(), "DeepSpeed ZeRO settings")
    optim: OptimConfig = option(OptimConfig(), "optimizer and learning-rate schedule")
    train: TrainConfig = option(TrainConfig(), "batching and schedule")
    output: OutputConfig = option(OutputConfig(), "where results go")
    launch: LaunchConfig = option(LaunchConfig(), "process launch")


"""The SPMD runner: every rank walks the experiment's MFC graph in one fixed order, step by step.

It owns the loop every algorithm shares: data order, evaluation, metrics, DeepSpeed checkpoints
(`--resume`), the final HF checkpoints and summary.json. Algorithms only supply MFC interfaces.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoTokenizer

from ds_realloc.algorithms.interface import Batch, Metrics
from ds_realloc.data.datasets import ChatFormatter, load_records, tokenize_records
from ds_realloc.data.sampler import StepSampler, eval_shard, micro_batches, rank_slice
from ds_realloc.dataflow.config import check_world_fit
from ds_realloc.dataflow.experiments import Experiment, RoleSpec
from ds_realloc.dataflow.metrics import MetricsWriter, reduce_max, reduce_metrics
from ds_realloc.dataflow.mfc import MFC, MFCKind, topological_order
from ds_realloc.engine.checkpoint import load_training_state, save_hf_model, save_training_state
from ds_realloc.engine.ds_config import BatchGeometry, frozen_ds_config, lr_schedule, train_ds_config
from ds_realloc.engine.factory import build_frozen_model, build_train_engine
from ds_realloc.models.presets import resolve_model_path
from ds_realloc.utils.config import to_dict
from ds_realloc.utils.dist import init_distributed
from ds_realloc.utils.logging import get_logger, setup_logging
from ds_realloc.utils.memory import memory_stats

logger = get_logger(__name__)

_FRESH_RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "tensorboard", "checkpoints", "hf")


def run_dir(experiment: Experiment, cfg: Any) -> Path:
    return Path(cfg.output.dir or f"runs/{experiment.command}")


@dataclass
class Models:
    """The engines of a run by role: DeepSpeed training engines and frozen models."""

    trained: dict[str, Any] = field(default_factory=dict)
    frozen: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, role: str):
        return self.trained[role] if role in self.trained else self.frozen[role]


def _build_models(roles: list[RoleSpec], paths: dict[str, Path], cfg: Any, geometry: BatchGeometry,
                  total_steps: int, pad_id: int) -> Models:
    models = Models()
    train_config = train_ds_config(cfg.engine, cfg.optim, geometry, total_steps)
    for spec in roles:
        if spec.trainable:
            models.trained[spec.role] = build_train_engine(
                paths[spec.role], spec.head, train_config, lr_schedule(cfg.optim, total_steps),
                cfg.engine.gradient_checkpointing, pad_id)
    for spec in roles:
        if not spec.trainable:
            models.frozen[spec.role] = build_frozen_model(
                paths[spec.role], spec.head, frozen_ds_config(train_config, spec.offload), spec.offload, pad_id)
    return models


def _run_mfc(mfc: MFC, model, interface, batch: Batch) -> tuple[Batch, Metrics]:
    if mfc.kind is MFCKind.TRAIN:
        return {}, interface.train_step(model, batch)
    with model.resident() if hasattr(model, "resident") else contextlib.nullcontext():
        return interface.inference(model, batch), {}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Run:
    """State of one run on one rank."""

    experiment: Experiment
    cfg: Any
    rank: int
    world: int
    out: Path
    tokenizer: Any
    train_set: list
    eval_set: list
    sampler: StepSampler
    total_steps: int
    models: Models
    interfaces: dict[str, Any]
    order: list[MFC]
    writer: MetricsWriter
    step: int = 0
    eval_before: dict[str, float] = field(default_factory=dict)
    elapsed_before_s: float = 0.0
    mfc_seconds: dict[str, list[float]] = field(default_factory=dict)

    # -- one step ------------------------------------------------------------------------------

    def _batch(self, samples: list, valid: list[bool] | None = None) -> Batch:
        batch: Batch = {self.experiment.sample_key: samples}
        if valid is not None:
            batch["valid"] = valid
        return batch

    def train_step(self) -> dict[str, float]:
        indices = rank_slice(self.sampler.global_batch(self.step), self.rank, self.world)
        batch = self._batch([self.train_set[i] for i in indices])
        metrics: Metrics = {}
        times: dict[str, float] = {}
        start = time.perf_counter()
        for mfc in self.order:
            begin = time.perf_counter()
            outputs, mfc_metrics = _run_mfc(mfc, self.models[mfc.role], self.interfaces[mfc.name], batch)
            _sync()
            times[f"time/{mfc.name}_s"] = time.perf_counter() - begin
            batch.update(outputs)
            metrics.update({f"{mfc.role}/{name}": value for name, value in mfc_metrics.items()})
        step_time = time.perf_counter() - start
        values = reduce_metrics(metrics)
        values.update(reduce_max({**times, **memory_stats(), "time/step_s": step_time}))
        for role, engine in self.models.trained.items():
            values[f"{role}/lr"] = float(engine.get_lr()[0])
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                values[f"{role}/grad_norm"] = float(grad_norm)
            tokens = values.pop(f"{role}/tokens", None)
            if tokens is not None:
                values[f"{role}/tokens_per_s"] = tokens / values["time/step_s"]
        for name, seconds in times.items():
            self.mfc_seconds.setdefault(name.removeprefix("time/").removesuffix("_s"), []).append(seconds)
        return values

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Metrics of every trained model on the held-out set, after the inference MFCs they need."""
        if not self.eval_set:
            return {}
        for engine in self.models.trained.values():
            engine.eval()
        per_rank = self.cfg.train.batch_size // self.world
        metrics: Metrics = {}
        for chunk in micro_batches(eval_shard(len(self.eval_set), self.rank, self.world), per_rank):
            batch = self._batch([self.eval_set[i] for i, _ in chunk], [ok for _, ok in chunk])
            for mfc in self.order:
                model, interface = self.models[mfc.role], self.interfaces[mfc.name]
                if mfc.kind is MFCKind.TRAIN:
                    for name, value in interface.evaluate(model, batch).items():
                        total, count = metrics.get(f"eval/{mfc.role}/{name}", (0.0, 0.0))
                        metrics[f"eval/{mfc.role}/{name}"] = (total + value[0], count + value[1])
                else:
                    batch.update(_run_mfc(mfc, model, interface, batch)[0])
        for engine in self.models.trained.values():
            engine.train()
        return reduce_metrics(metrics)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_training_state(self, elapsed_s: float) -> None:
        client_state = {"step": self.step, "eval_before": self.eval_before, "elapsed_s": elapsed_s}
        for role, engine in self.models.trained.items():
            save_training_state(engine, self.out / "checkpoints" / role, f"step{self.step}", client_state)

    def resume(self) -> None:
        states = [load_training_state(engine, self.out / "checkpoints" / role)
                  for role, engine in self.models.trained.items()]
        self.step = states[0]["step"]
        self.eval_before = states[0]["eval_before"]
        self.elapsed_before_s = states[0]["elapsed_s"]
        logger.info("resumed %s at step %d from %s", self.experiment.command, self.step, self.out / "checkpoints")

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        start = time.perf_counter()
        if self.cfg.output.resume:
            self.resume()
        elif self.eval_set:
            self.eval_before = self.evaluate()
            self.writer.log(0, self.eval_before)
            logger.info("eval before training: %s", _fmt(self.eval_before))
        progress = tqdm(total=self.total_steps, initial=self.step, desc=self.experiment.command,
                        disable=self.rank != 0, dynamic_ncols=True)
        eval_after = dict(self.eval_before)
        every_eval, every_save = self.cfg.train.eval_every, self.cfg.train.save_every
        while self.step < self.total_steps:
            values = self.train_step()
            self.step += 1
            last = self.step == self.total_steps
            if (every_eval and self.step % every_eval == 0) or last:
                eval_after = self.evaluate()
                values.update(eval_after)
            self.writer.log(self.step, values)
            progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items()
                                  if k.endswith(("/loss", "accuracy"))}, refresh=False)
            progress.update()
            if (every_save and self.step % every_save == 0) or last:
                self.save_training_state(self.elapsed_before_s + time.perf_counter() - start)
        progress.close()
        if self.cfg.output.save_hf:
            for role, engine in self.models.trained.items():
                save_hf_model(engine.module, self.tokenizer, self.out / "hf" / role)
        summary = {
            "command": self.experiment.command,
            "steps": self.step,
            "eval_before": self.eval_before,
            "eval_after": eval_after,
            "wall_s": self.elapsed_before_s + time.perf_counter() - start,
            "mean_time_per_mfc_s": {name: sum(t) / len(t) for name, t in self.mfc_seconds.items()},
        }
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
            logger.info("eval after training: %s", _fmt(eval_after))
        self.writer.close()
        return summary


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))


def _load_split(experiment: Experiment, cfg: Any, formatter: ChatFormatter, split: str) -> list:
    spec = cfg.data.train if split == "train" else cfg.data.eval
    if not spec:
        return []
    records = load_records(spec, split, experiment.data_format)
    return tokenize_records(records, experiment.data_format, formatter, cfg.data.max_seq_len,
                            cfg.data.skip_bad_samples)


def _prepare_run_dir(out: Path, resume: bool, rank: int) -> None:
    """A fresh run replaces the outputs of an earlier run in the same folder; a resumed one appends."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in _FRESH_RUN_OUTPUTS:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    dist.barrier()


def run_experiment(experiment: Experiment, cfg: Any) -> dict:
    """Run a training experiment on this rank (all ranks call this with the same config)."""
    rank, world = init_distributed(cfg.launch.dist_timeout_s)
    out = run_dir(experiment, cfg)
    setup_logging(rank, out / "logs")
    grad_accum = check_world_fit(cfg.train, world)
    _prepare_run_dir(out, cfg.output.resume, rank)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.train.seed)
    roles = experiment.roles(cfg)
    paths = {spec.role: resolve_model_path(spec.path, spec.path_field) for spec in roles}
    tokenizer = AutoTokenizer.from_pretrained(paths[roles[0].role])
    formatter = ChatFormatter(tokenizer, cfg.data.chat_template)
    train_set = _load_split(experiment, cfg, formatter, "train")
    eval_set = _load_split(experiment, cfg, formatter, "eval")
    sampler = StepSampler(len(train_set), cfg.train.batch_size, cfg.train.seed)
    total_steps = cfg.train.max_steps or cfg.train.epochs * sampler.steps_per_epoch
    logger.info("%s: %d training samples, %d eval samples, %d steps on %d ranks", experiment.command,
                len(train_set), len(eval_set), total_steps, world)
    geometry = BatchGeometry(cfg.train.micro_batch_size, grad_accum, world)
    models = _build_models(roles, paths, cfg, geometry, total_steps, tokenizer.pad_token_id)
    run = Run(experiment, cfg, rank, world, out, tokenizer, train_set, eval_set, sampler, total_steps, models,
              experiment.interfaces(cfg, tokenizer.pad_token_id), topological_order(experiment.mfcs),
              MetricsWriter(out, rank == 0))
    return run.run()

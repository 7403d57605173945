"""The SPMD runner: every rank walks the experiment's MFC graph in one fixed order, step by step.

`run_experiment` plans the run (`setup`), builds the models, and hands the loop to `Runner`:

    evaluate (or resume) -> for each step: walk the MFC graph (`walk.Walker`) on the step's rows,
    move the reference (ref.ema), log the step's metrics, evaluate / checkpoint when due
    -> final HF checkpoints and summary.json

Evaluation (`evaluation.Evaluator`), checkpoints (`checkpointing.CheckpointManager`) and step
metrics (`metrics.StepMetrics`) are components the loop calls; what every algorithm shares - data
order, metrics, DeepSpeed checkpoints (`--resume`), HF checkpoints - lives here once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ds_realloc.data.sampler import StepSampler
from ds_realloc.dataflow.checkpointing import CheckpointManager
from ds_realloc.dataflow.config import RunConfig
from ds_realloc.dataflow.evaluation import Evaluator
from ds_realloc.dataflow.experiment import Experiment, Interface
from ds_realloc.dataflow.metrics import MetricsWriter, StepMetrics, StepTable, format_values
from ds_realloc.dataflow.mfc import MFC
from ds_realloc.dataflow.setup import build_models, load_data, placement_labels, plan_run, prepare_run_dir, run_dir
from ds_realloc.dataflow.spans import SpanRecorder
from ds_realloc.dataflow.walk import Walker, new_store
from ds_realloc.engine.checkpoint import save_hf_model
from ds_realloc.utils.dist import comm_device, command_start_time, init_distributed, is_peer_failure
from ds_realloc.utils.errors import PeerLost, UserError
from ds_realloc.utils.logging import get_logger, setup_logging
from ds_realloc.utils.memory import return_freed_memory

logger = get_logger(__name__)


@dataclass
class Runner:
    """The loop of one run on one rank."""

    experiment: Experiment
    cfg: RunConfig
    out: Path
    tokenizer: object
    walker: Walker
    order: list[MFC]
    interfaces: dict[str, Interface]
    train_set: list
    sampler: StepSampler
    total_steps: int
    evaluator: Evaluator
    checkpoints: CheckpointManager
    writer: MetricsWriter
    metrics: StepMetrics = field(default_factory=StepMetrics)
    step: int = 0
    eval_before: dict[str, float] = field(default_factory=dict)
    train_before_s: float = 0.0  # the training loop's seconds before a resume
    predicted: dict[str, float] = field(default_factory=dict)  # allocation=auto: the planner's seconds per MFC

    @property
    def rank(self) -> int:
        return self.walker.rank

    def train_step(self) -> dict[str, float]:
        """One step: the MFC graph on the step's rows, then the reference's move; its metrics."""
        geometry = self.walker.settings.geometry
        samples = [self.train_set[i] for i in self.sampler.global_batch(self.step)]
        store = new_store(self.experiment.sample_key, samples, geometry.samples_per_prompt, self.step)
        start = time.perf_counter()
        spans = self.walker.spans
        if spans is not None:
            spans.begin_step(self.step + 1)
            step_start = spans.now()
        metrics, timings = self.walker.walk(self.order, store, geometry.rows, self.interfaces, f"step {self.step + 1}")
        timings.update(self._update_reference())
        step_s = time.perf_counter() - start
        if spans is not None:
            spans.end_step(step_start, spans.now())
        self.walker.doing = f"the metrics of step {self.step + 1}"
        engines = {name: role.engine for name, role in self.walker.roles.items() if role.engine is not None}
        values = self.metrics.values(metrics, timings, step_s, engines)
        values.update({f"plan/predicted_{name}_s": seconds for name, seconds in self.predicted.items()})
        return values

    def _update_reference(self) -> dict[str, float]:
        """The reference EMA (`ref.ema`): the actor's new weights blended into the reference's partitions."""
        if not self.checkpoints.reference_moves:
            return {}
        self.walker.doing = f"the reference EMA of step {self.step + 1}"
        start = time.perf_counter()
        actor, ref = self.walker.roles["actor"], self.walker.roles["ref"]
        stats = actor.hybrid.blend_into(ref.hybrid, self.walker.settings.reference_ema)
        ref.version += 1  # on every rank: kept inference copies of the reference are stale
        return {"realloc/ref_ema_s": time.perf_counter() - start,
                "realloc/ref_ema_recv_bytes": float(stats.received_elements * actor.hybrid.dtype.itemsize)}

    def run(self) -> dict:
        """Train (or resume), evaluate and save; a dead or hung peer rank stops this rank with an
        error naming the call it happened in, instead of a hang or a transport traceback."""
        try:
            return self._run()
        except Exception as error:
            if isinstance(error, UserError) or not is_peer_failure(error):
                raise
            tag = self.checkpoints.latest()
            resume = f"--resume continues from {tag}" if tag else "no checkpoint was written yet (train.save_every)"
            raise PeerLost(f"rank {self.rank} lost contact with another rank during {self.walker.doing}: a rank died "
                           f"or stopped answering, so this one stops too; {resume}. "
                           f"({str(error).splitlines()[0][:300]})") from None

    def _run(self) -> dict:
        if self.cfg.output.resume:
            self._resume()
        elif self.evaluator.eval_set:
            self.eval_before = self.evaluator.evaluate(self.step)
            self.writer.log(0, self.eval_before)
            logger.info("eval before training: %s", format_values(self.eval_before))
        table = StepTable(self.experiment.table, self.rank == 0)
        eval_after = dict(self.eval_before)
        every_eval, every_save = self.cfg.train.eval_every, self.cfg.train.save_every
        train_s = self.train_before_s
        while self.step < self.total_steps:
            step_start = time.perf_counter()
            values = self.train_step()
            train_s += time.perf_counter() - step_start
            self.step += 1
            last = self.step == self.total_steps
            if (every_eval and self.step % every_eval == 0) or last:
                eval_after = self.evaluator.evaluate(self.step)
                values.update(eval_after)
            self.writer.log(self.step, values)
            table.row(self.step, self.total_steps, values)
            if (every_save and self.step % every_save == 0) or last:
                self.walker.doing = f"saving the checkpoint of step {self.step}"
                self.checkpoints.save(self.step, {"eval_before": self.eval_before, "train_s": train_s})
        if self.cfg.output.save_hf:
            self._save_hf()
        summary = {
            "command": self.experiment.command,
            "steps": self.step,
            "eval_before": self.eval_before,
            "eval_after": eval_after,
            "wall_s": time.time() - command_start_time(),  # the whole command: start-up, evaluations, saving
            "train_s": train_s,
            "allocations": placement_labels(self.walker.allocations, self.walker.roles),
            "mean_time_per_mfc_s": self.metrics.mean_seconds(),
        }
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
            logger.info("eval after training: %s", format_values(eval_after))
        self.writer.close()
        return summary

    def _resume(self) -> None:
        state = self.checkpoints.load()
        self.step, self.eval_before, self.train_before_s = state["step"], state["eval_before"], state["train_s"]
        self.writer.truncate_after(self.step)
        logger.info("resumed %s at step %d from %s", self.experiment.command, self.step, self.checkpoints.folder)

    def _save_hf(self) -> None:
        """An HF folder per trained role, written by the first rank of the role's mesh."""
        for name, role in self.walker.roles.items():
            if role.engine is not None:
                save_hf_model(role.engine.module, self.tokenizer, self.out / "hf" / name, writer=role.mesh.ranks[0],
                              group=role.group)
        dist.barrier()


def run_experiment(experiment: Experiment, cfg: RunConfig, predicted: dict[str, float] | None = None) -> dict:
    """Run an experiment on this rank (all ranks call this with the same config); `predicted`: the
    planner's seconds per MFC (allocation=auto), logged beside the measured ones every step."""
    rank, world = init_distributed(cfg.launch.dist_timeout_s)
    if comm_device().type == "cpu":
        # Host memory holds the tensors: glibc would keep the freed heap blocks of each step's tensors
        # (shapes change every step: lengths, MoE routing) and the RSS would creep up step after step.
        return_freed_memory()
    out = run_dir(experiment, cfg)
    setup_logging(rank, out / "logs")
    prepare_run_dir(out, cfg, rank)
    torch.manual_seed(cfg.train.seed)
    plan = plan_run(experiment, cfg, world)
    data = load_data(experiment, cfg, plan.paths[experiment.roles(cfg)[0].role])
    roles, context = build_models(experiment, cfg, plan, data)
    logger.info("%s: %d training samples, %d eval samples, %d steps of %d rows on %d ranks; %s", experiment.command,
                len(data.train_set), len(data.eval_set), data.total_steps, plan.settings.geometry.rows, world,
                "; ".join(f"{name} {label}" for name, label in placement_labels(plan.allocations, roles).items()))
    order = [allocation.mfc for allocation in plan.allocations.values()]  # topological
    interfaces = experiment.interfaces(cfg, context)
    walker = Walker(rank, plan.settings, roles, plan.allocations, cfg.engine.inference == "zero3",
                    spans=SpanRecorder(out, rank, {"command": experiment.command, "world": world}))
    evaluator = Evaluator(experiment, walker, order, interfaces, context, data.eval_set, cfg.train.batch_size)
    checkpoints = CheckpointManager(out / "checkpoints", rank, roles, interfaces,
                                    bool(plan.settings.reference_ema) and "ref" in roles)
    runner = Runner(experiment, cfg, out, data.tokenizer, walker, order, interfaces, data.train_set, data.sampler,
                    data.total_steps, evaluator, checkpoints, MetricsWriter(out, rank == 0),
                    predicted=dict(predicted or {}))
    return runner.run()

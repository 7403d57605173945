"""Evaluation on the held-out rows: the step's own MFC graph (training calls evaluate instead of
stepping), or, for RL, greedy generations scored by the run's reward call."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ds_realloc.algorithms.interface import Metrics, add_metric
from ds_realloc.algorithms.rollout import GenerateInterface
from ds_realloc.dataflow.experiment import Experiment, Interface, InterfaceContext
from ds_realloc.dataflow.metrics import reduce_metrics
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.dataflow.walk import VALID, Walker, new_store
from ds_realloc.models.generate import GenerationConfig


@dataclass
class Evaluator:
    experiment: Experiment
    walker: Walker
    order: list[MFC]
    interfaces: dict[str, Interface]
    context: InterfaceContext
    eval_set: list
    batch_size: int  # rows of a training step: evaluation chunks split over every mesh like them

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.eval_set:
            return {}
        if self.experiment.evaluation == "generation":
            return self._generation(step)
        engines = [role.engine for role in self.walker.roles.values() if role.engine is not None]
        for engine in engines:
            engine.eval()
        metrics: Metrics = {}
        size = self.batch_size
        for first in range(0, len(self.eval_set), size):
            chunk = self.eval_set[first:first + size]
            padded = chunk + [chunk[0]] * (size - len(chunk))  # padding rows do not count (valid=False)
            store = new_store(self.experiment.sample_key, padded, 1, step, len(chunk))
            chunk_metrics, _ = self.walker.walk(self.order, store, size, self.interfaces, "evaluation", evaluating=True)
            for name, value in chunk_metrics.items():
                add_metric(metrics, name, *value)
        for engine in engines:
            engine.train()
        return reduce_metrics(metrics)

    def _generation(self, step: int) -> dict[str, float]:
        """Greedy completions of the held-out prompts, scored by the run's own reward MFC (its reward
        function or reward model): mean reward, and accuracy when every score is 0 or 1."""
        settings, allocations, rank = self.walker.settings, self.walker.allocations, self.walker.rank
        generate = next(m for m in self.order if m.kind is MFCKind.GENERATE)
        reward = next(m for m in self.order if m.output_keys == ("score",))
        prompts = self.eval_set[:settings.eval_prompts or len(self.eval_set)]
        multiple = math.lcm(*(len(allocations[m.name].dp_groups) for m in (generate, reward)))
        rows = -(-len(prompts) // multiple) * multiple
        padded = prompts + [prompts[0]] * (rows - len(prompts))
        greedy = GenerateInterface(GenerationConfig(max_new_tokens=settings.eval_max_new_tokens, greedy=True),
                                   self.context.eos_ids, self.context.pad_id)
        store = new_store(self.experiment.sample_key, padded, 1, step, len(prompts))
        self.walker.walk([generate, reward], store, rows, {generate.name: greedy, reward.name: self.interfaces[reward.name]},
                         "evaluation")
        metrics: Metrics = {}
        split = allocations[reward.name].split(rows)
        if rank in allocations[reward.name].mesh and split.groups[split.group_of(rank)][0] == rank:
            mine = [r for r in split.rows_of(rank) if store[VALID][r]]
            scores = [float(store["score"][r]) for r in mine]
            add_metric(metrics, "eval/reward", sum(scores), float(len(mine)))
            add_metric(metrics, "eval/non_binary", float(sum(s not in (0.0, 1.0) for s in scores)), None)
            add_metric(metrics, "eval/response_length", float(sum(len(store["completion"][r]) for r in mine)),
                       float(len(mine)))
        values = reduce_metrics(metrics)
        if values.pop("eval/non_binary", 1.0) == 0:  # 0/1 rewards (a verifier): the mean is an accuracy
            values["eval/accuracy"] = values["eval/reward"]
        return values

"""The inference side of RL: generating completions, scoring them (reward function or reward model),
reference log-probs and critic values.

Per-row data: `prompt` (a PromptSample), `completion` (token ids, EOS included when generated),
`gen_logprobs` [n], `truncated` (no EOS within the length limit), `score`, `ref_logprobs` [n] and
`values` [n + 1] (states before each action and after the last). Sequences are left-padded, so
every completion ends at the last column and action-level tensors are right-aligned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from ds_realloc.algorithms.interface import Batch, InferenceInterface
from ds_realloc.data.rewards import RewardFunction, call_reward
from ds_realloc.models.attention import positions_of
from ds_realloc.models.generate import GenerationConfig, completion_ids


@dataclass(frozen=True)
class Rollouts:
    """Left-padded prompt + completion tokens of a batch of rows."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    lengths: tuple[int, ...]  # completion lengths n_i

    @staticmethod
    def of(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> "Rollouts":
        rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return Rollouts(ids, mask, tuple(len(c) for c in completions))

    @property
    def positions(self) -> torch.Tensor:
        return positions_of(self.attention_mask)

    @property
    def max_actions(self) -> int:
        return max(self.lengths)

    def action_mask(self) -> torch.Tensor:
        """[B, K] (K = the longest completion): 1 on each row's actions, right-aligned."""
        width = self.max_actions
        return torch.stack([torch.arange(width) >= width - n for n in self.lengths]).long()

    def actions_of(self, per_position: torch.Tensor) -> list[torch.Tensor]:
        """Each row's entries for its actions from a [B, T-1] tensor of next-token quantities."""
        return [per_position[i, per_position.shape[1] - n:] for i, n in enumerate(self.lengths)]

    def states_of(self, per_position: torch.Tensor) -> list[torch.Tensor]:
        """Each row's n + 1 state values (before every action and after the last) from [B, T]."""
        return [per_position[i, per_position.shape[1] - n - 1:] for i, n in enumerate(self.lengths)]


def right_aligned(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """[B, width]: each 1-D row at the right end, zeros before it."""
    out = torch.zeros((len(rows), width), dtype=rows[0].dtype if rows else torch.float32)
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row):] = row
    return out


def rollouts_of(batch: Batch, pad_id: int, completion_key: str = "completion") -> Rollouts:
    return Rollouts.of([s.prompt_ids for s in batch["prompt"]], batch[completion_key], pad_id)


@dataclass(frozen=True)
class GenerateInterface(InferenceInterface):
    """Samples one completion per row (rows of one prompt differ by their sampling noise)."""

    config: GenerationConfig
    eos_token_ids: tuple[int, ...]
    pad_id: int
    outputs: tuple[str, str, str] = ("completion", "gen_logprobs", "truncated")

    def inference(self, call, batch: Batch) -> Batch:
        seed = self.config.seed + 1_000_003 * batch["step"][0] + batch["row"][0]
        cfg = dataclasses.replace(self.config, seed=seed)
        generation = call.generate([s.prompt_ids for s in batch["prompt"]], cfg, self.eos_token_ids, self.pad_id)
        completions, logprobs, truncated = [], [], []
        for row in range(len(batch["prompt"])):
            ids = tuple(completion_ids(generation, row))
            completions.append(ids)
            logprobs.append(generation.logprobs[row, :len(ids)].float().cpu())
            truncated.append(not ids or ids[-1] not in self.eos_token_ids)
        key_completion, key_logprobs, key_truncated = self.outputs
        return {key_completion: completions, key_logprobs: logprobs, key_truncated: truncated}


@dataclass(frozen=True)
class RewardFunctionInterface(InferenceInterface):
    """Scores completions with a Python function (e.g. a verifiable reward)."""

    function: RewardFunction
    tokenizer: object
    name: str
    completion_key: str = "completion"
    output: str = "score"

    def texts(self, batch: Batch) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in batch[self.completion_key]]

    def inference(self, call, batch: Batch) -> Batch:
        prompts = batch["prompt"]
        fields: dict[str, list] = {"answer": [p.answer for p in prompts]}
        for key in dict(prompts[0].fields):
            fields[key] = [dict(p.fields).get(key) for p in prompts]
        scores = call_reward(self.function, [p.prompt for p in prompts], self.texts(batch), fields, self.name)
        return {self.output: scores}


@dataclass(frozen=True)
class RewardModelInterface(InferenceInterface):
    """Scores completions with a reward model: its value at each sequence's last token."""

    pad_id: int
    completion_key: str = "completion"
    output: str = "score"

    def inference(self, call, batch: Batch) -> Batch:
        rollouts = rollouts_of(batch, self.pad_id, self.completion_key)
        values = call.values(rollouts.input_ids, rollouts.attention_mask)
        return {self.output: values[:, -1].float().cpu().tolist()}  # left padding: the last column


@dataclass(frozen=True)
class LogprobsInterface(InferenceInterface):
    """Log-probs of the completion tokens under a model (the reference policy), at the policy's
    temperature (`models.generate.policy_temperature`)."""

    pad_id: int
    temperature: float = 1.0
    output: str = "ref_logprobs"

    def inference(self, call, batch: Batch) -> Batch:
        rollouts = rollouts_of(batch, self.pad_id)
        logprobs = call.logprobs(rollouts.input_ids, rollouts.attention_mask, rollouts.max_actions,
                                 self.temperature).float().cpu()
        return {self.output: rollouts.actions_of(logprobs)}


@dataclass(frozen=True)
class ValuesInterface(InferenceInterface):
    """Critic values of the states of every completion."""

    pad_id: int
    output: str = "values"

    def inference(self, call, batch: Batch) -> Batch:
        rollouts = rollouts_of(batch, self.pad_id)
        values = call.values(rollouts.input_ids, rollouts.attention_mask).float().cpu()
        return {self.output: rollouts.states_of(values)}

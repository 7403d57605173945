"""Tokenised datasets: SFT sequences, preference pairs and prompts, with answer-only loss masks.

Records come from JSONL files or built-in tasks (`builtin:<task>`) and are checked one by one: a
bad record raises a DataError naming its file, line and field, or, with `skip_bad_samples`, is
counted and logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ds_realloc.data.records import Record, read_jsonl
from ds_realloc.data.tasks import Format, Split, builtin_records
from ds_realloc.utils.errors import DataError
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class TokenizedSequence:
    """Token ids and a mask that is 1 on the tokens a loss is computed on (the answer)."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]


@dataclass(frozen=True)
class PairSample:
    chosen: TokenizedSequence
    rejected: TokenizedSequence


@dataclass(frozen=True)
class PromptSample:
    prompt: str
    prompt_ids: tuple[int, ...]
    answer: str | None  # reference answer for verifiable rewards and evaluation
    fields: tuple[tuple[str, object], ...] = ()  # the record's other fields, passed to reward functions


class ChatFormatter:
    """Turns prompts, answers and chats into token ids with the tokenizer's chat template."""

    def __init__(self, tokenizer, use_chat_template: bool = True):
        if use_chat_template and not tokenizer.chat_template:
            raise DataError("data.chat_template is true but the model's tokenizer has no chat template; "
                            "set data.chat_template=false to use raw text")
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        if not self.use_chat_template:
            return self.encode(prompt)
        return self.encode(self._render([{"role": "user", "content": prompt}], add_generation_prompt=True))

    def completion_ids(self, answer: str) -> list[int]:
        return self.encode(answer) + [self.tokenizer.eos_token_id]

    def answered(self, prompt: str, answer: str) -> TokenizedSequence:
        prompt_ids, answer_ids = self.prompt_ids(prompt), self.completion_ids(answer)
        return TokenizedSequence(tuple(prompt_ids + answer_ids), (0,) * len(prompt_ids) + (1,) * len(answer_ids))

    def conversation(self, messages: list[dict], source: str) -> TokenizedSequence:
        """A chat with loss on every assistant turn: each turn is the text the template adds for it."""
        if not self.use_chat_template:
            raise DataError(f"{source}: 'messages' records need a chat template (data.chat_template=true)")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{source}: the last message must be the assistant's answer, got role '{messages[-1]['role']}'")
        ids: list[int] = []
        mask: list[int] = []
        rendered = ""
        for i, message in enumerate(messages):
            is_answer = message["role"] == "assistant"
            before = self._render(messages[:i], add_generation_prompt=True) if is_answer else rendered
            after = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (before.startswith(rendered) and after.startswith(before)):
                raise DataError(f"{source}: the chat template does not render message {i} as an extension of the "
                                "earlier ones, so assistant turns cannot be masked")
            for text, target in ((before[len(rendered):], 0), (after[len(before):], int(is_answer))):
                piece = self.encode(text) if text else []
                ids += piece
                mask += [target] * len(piece)
            rendered = after
        return TokenizedSequence(tuple(ids), tuple(mask))


def _check_length(seq: TokenizedSequence, max_len: int, source: str, what: str = "sample") -> TokenizedSequence:
    if len(seq.input_ids) > max_len:
        raise DataError(f"{source}: {what} has {len(seq.input_ids)} tokens, more than data.max_seq_len={max_len}")
    if not any(seq.loss_mask):
        raise DataError(f"{source}: {what} has no answer tokens to train on")
    return seq


def _sft_sample(record: Record, fmt: ChatFormatter, max_len: int) -> TokenizedSequence:
    if "messages" in record.fields:
        seq = fmt.conversation(record.messages(), record.source)
    else:
        if "prompt" not in record.fields and "answer" not in record.fields:
            raise DataError(f"{record.source}: an SFT record needs fields 'prompt' and 'answer', or 'messages'")
        seq = fmt.answered(record.text("prompt"), record.text("answer"))
    return _check_length(seq, max_len, record.source)


def _pair_sample(record: Record, fmt: ChatFormatter, max_len: int) -> PairSample:
    prompt = record.text("prompt")
    chosen, rejected = record.text("chosen"), record.text("rejected")
    return PairSample(_check_length(fmt.answered(prompt, chosen), max_len, record.source, "'chosen' sequence"),
                      _check_length(fmt.answered(prompt, rejected), max_len, record.source, "'rejected' sequence"))


def _prompt_sample(record: Record, fmt: ChatFormatter, max_len: int) -> PromptSample:
    prompt = record.text("prompt")
    ids = fmt.prompt_ids(prompt)
    if len(ids) > max_len:
        raise DataError(f"{record.source}: prompt has {len(ids)} tokens, more than data.max_prompt_len={max_len}")
    extra = tuple((k, v) for k, v in record.fields.items() if k not in ("prompt", "answer"))
    return PromptSample(prompt, tuple(ids), record.text("answer", optional=True), extra)


_BUILDERS = {"sft": _sft_sample, "pairs": _pair_sample, "prompts": _prompt_sample}


def load_records(spec: str, split: Split, fmt: Format) -> list[Record]:
    """Records from `builtin:<task>` (its `split`) or a JSONL file."""
    if spec.startswith("builtin:"):
        return builtin_records(spec, split, fmt)
    return read_jsonl(spec)


def tokenize_records(records: Sequence[Record], fmt: Format, formatter: ChatFormatter, max_len: int,
                     skip_bad_samples: bool = False) -> list:
    """Tokenised samples of one format; bad records raise, or are counted and logged when skipping."""
    build = _BUILDERS[fmt]
    samples, skipped = [], []
    for record in records:
        try:
            samples.append(build(record, formatter, max_len))
        except DataError as e:
            if not skip_bad_samples:
                raise
            skipped.append(str(e))
    if skipped:
        logger.warning("skipped %d of %d records (data.skip_bad_samples=true); first: %s",
                       len(skipped), len(records), "; ".join(skipped[:3]))
    if not samples:
        raise DataError(f"no usable records in {records[0].source.rsplit(':', 1)[0] if records else 'the data'}")
    return samples


def pad_sequences(seqs: Sequence[TokenizedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `loss_mask` tensors of shape [batch, longest]."""
    longest = max(len(s.input_ids) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = len(seq.input_ids)
        input_ids[row, :n] = torch.tensor(seq.input_ids)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(seq.loss_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}

"""Batched generation with a preallocated KV cache on tensor-parallel shards.

Prompts are left-padded to the longest; the cache holds prompt + max_new_tokens slots. Each step
samples from the vocab-parallel logits without gathering them where it can: greedy is a
distributed argmax; temperature sampling is the Gumbel-max trick with noise every TP rank draws
from the same seeded generator; top-k gathers only each rank's k best; top-p without top-k is the
one case that gathers the full logits. TP ranks therefore pick identical tokens, and a fixed seed
reproduces a generation exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from ds_realloc.models.attention import KVCache, attention_mask, positions_of
from ds_realloc.models.tp import TensorParallel, VocabShard, argmax, token_logprobs
from ds_realloc.utils.config import invalid, option
from ds_realloc.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class GenerationConfig:
    max_new_tokens: int = option(64, "tokens to generate at most per prompt")
    min_new_tokens: int = option(0, "EOS is not allowed before this many tokens")
    greedy: bool = option(False, "take the most likely token (ignores temperature, top_k, top_p)")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(0, "sample among the k most likely tokens (0 = all)")
    top_p: float = option(1.0, "sample among the smallest set of tokens with this probability mass")
    seed: int = option(0, "sampling seed (the same on every tensor-parallel rank)")
    cuda_graph: bool = option(False, "on CUDA, capture the decode step of each generate call once as a CUDA graph "
                                     "and replay it every step (dense models; elsewhere no effect, said once)")

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise invalid("max_new_tokens", "must be at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise invalid("min_new_tokens", "must be within [0, max_new_tokens]")
        if self.temperature <= 0:
            raise invalid("temperature", "must be positive (use greedy=true for argmax)")
        if not 0 < self.top_p <= 1:
            raise invalid("top_p", "must be within (0, 1]")
        if self.top_k < 0:
            raise invalid("top_k", "must be >= 0")


def sampling_of(cfg: GenerationConfig, **changes) -> GenerationConfig:
    """The plain GenerationConfig of a config group that extends it (e.g. `rollout`), with `changes`."""
    return GenerationConfig(**{**{f.name: getattr(cfg, f.name) for f in fields(GenerationConfig)}, **changes})


def policy_temperature(cfg: GenerationConfig) -> float:
    """The temperature of the policy's log-probs: the sampling temperature (1 when greedy)."""
    return 1.0 if cfg.greedy else cfg.temperature


@dataclass
class Generation:
    """Generated tokens [B, N] (pad after EOS), their log-probs, and a mask that is 1 on generated
    tokens (EOS included). N <= max_new_tokens: generation stops when every row has finished.

    The log-probs are the policy's: log softmax(logits / temperature) of the chosen token, *before*
    top-k / top-p / min_new_tokens truncation (those change which tokens are sampled, not the
    policy being trained), so they are the same quantity actor training, the reference and any
    recompute compute (`policy_temperature`); what truncation adds is corrected by importance
    weights (algo.tis_cap), not folded in here."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the smallest prefix of the sorted distribution reaching `top_p` (HF's rule)."""
    if top_p >= 1:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    cumulative = ordered.softmax(-1).cumsum(-1)
    drop = cumulative - ordered.softmax(-1) >= top_p  # keep the token that crosses the threshold
    return logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, vocab: VocabShard, tp: TensorParallel, cfg: GenerationConfig,
           generator: torch.Generator) -> torch.Tensor:
    """Next tokens [B] from vocab-parallel logits [B, V/tp], identical on every TP rank."""
    if cfg.greedy:
        return argmax(logits, vocab, tp)
    scaled = logits / cfg.temperature
    if cfg.top_k:
        values, index = scaled.topk(min(cfg.top_k, scaled.shape[-1]), dim=-1)
        values = tp.all_gather(values).permute(1, 0, 2).flatten(1)  # [B, tp*k]: every rank's best
        ids = tp.all_gather(index + vocab.start).permute(1, 0, 2).flatten(1)
        values, best = values.topk(min(cfg.top_k, values.shape[-1]), dim=-1)
        probs = _top_p_filter(values, cfg.top_p).softmax(-1)
        choice = torch.multinomial(probs, 1, generator=generator)
        return ids.gather(-1, best.gather(-1, choice)).squeeze(-1)
    if cfg.top_p < 1:  # nucleus sampling needs the whole sorted distribution: gather the logits
        full = tp.all_gather(scaled).permute(1, 0, 2).flatten(1)[:, :vocab.vocab]
        probs = _top_p_filter(full, cfg.top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # Gumbel-max: argmax(logits + Gumbel noise) is a sample of softmax(logits); every rank draws the
    # noise of the whole vocabulary from the same generator and keeps its own slice.
    uniform = torch.rand((scaled.shape[0], vocab.vocab), generator=generator, device=scaled.device)
    noise = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0)))
    local = noise[:, vocab.start:vocab.start + vocab.valid]
    noisy = scaled.clone()
    noisy[:, :vocab.valid] += local
    return argmax(noisy, vocab, tp)


def _forbid(logits: torch.Tensor, tokens: Sequence[int], vocab: VocabShard) -> None:
    for token in tokens:
        if vocab.start <= token < vocab.start + vocab.valid:
            logits[:, token - vocab.start] = float("-inf")


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a left-padded [B, longest] batch of ids and its attention mask (CPU, long)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    return ids, mask


class StaticDecode:
    """A decode step whose inputs live in fixed tensors and whose attention spans the whole cache (the
    slots not written yet are masked out), so its shapes never change during a generate call. With
    `graph` (CUDA) it is captured once as a CUDA graph - the weights and the cache stay where they are
    for the call - and replayed every step, instead of launching every kernel of every layer again."""

    def __init__(self, model, cache: KVCache, valid: torch.Tensor, graph: bool):
        self.model, self.cache, self.valid = model, cache, valid
        self.token = torch.zeros((valid.shape[0], 1), dtype=torch.long, device=valid.device)
        self.position = torch.zeros_like(self.token)
        self.slot = torch.zeros(1, dtype=torch.long, device=valid.device)
        self.use_graph, self.graph, self.logits = graph, None, None

    def _step(self) -> torch.Tensor:
        mask = attention_mask(self.valid, self.slot, self.model.sliding_window)
        return self.model.logits(self.model.hidden(self.token, self.position, mask, self.cache, self.slot)[:, -1])

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (allocator, library workspaces); rewrites the same slot alike
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def __call__(self, token: torch.Tensor, position: torch.Tensor, slot: int) -> torch.Tensor:
        """This rank's logits [B, vocab shard] of the next token after `token` [B, 1] at cache slot `slot`."""
        self.token.copy_(token)
        self.position.copy_(position)
        self.slot.fill_(slot)
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.clone()


@functools.lru_cache(maxsize=None)
def _say_no_cuda_graph(why: str) -> None:
    logger.info("cuda_graph: %s; decoding without CUDA graphs", why)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, eos_token_ids: Sequence[int],
             pad_token_id: int, static_decode: bool | None = None) -> Generation:
    """Continue every prompt (token ids) with up to `cfg.max_new_tokens` tokens. Decoding runs the
    model's dynamic-shape step, or with `cfg.cuda_graph` on CUDA a captured `StaticDecode`;
    `static_decode` True runs `StaticDecode` eagerly anywhere (tests compare the two)."""
    device, batch = model.device, len(prompts)
    input_ids, prompt_mask = left_padded(prompts, pad_token_id)
    longest = input_ids.shape[1]
    capacity = longest + cfg.max_new_tokens
    input_ids = input_ids.to(device)
    valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
    valid[:, :longest] = prompt_mask.bool()
    cache = KVCache(model.num_layers, batch, model.kv_heads, capacity, model.head_dim, model.dtype, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    eos = torch.tensor(list(eos_token_ids), device=device)
    hidden = model.hidden(input_ids, positions_of(valid[:, :longest]),
                          attention_mask(valid[:, :longest], torch.arange(longest, device=device), model.sliding_window),
                          cache, 0)
    logits = model.logits(hidden[:, -1])
    next_positions = valid[:, :longest].sum(-1)
    graph = cfg.cuda_graph and device.type == "cuda" and model.graphable
    if cfg.cuda_graph and not graph:
        _say_no_cuda_graph("not on CUDA" if device.type != "cuda" else
                           "the model's steps change shape with the routing (mixture of experts)")
    decode = StaticDecode(model, cache, valid, graph) if graph or static_decode else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs, masks = [], [], []
    temperature = policy_temperature(cfg)
    for step in range(cfg.max_new_tokens):
        allowed = logits
        if step < cfg.min_new_tokens:
            allowed = logits.clone()
            _forbid(allowed, eos_token_ids, model.vocab)
        token = sample(allowed, model.vocab, model.tp, cfg, generator)
        logprob = token_logprobs(logits / temperature if temperature != 1.0 else logits, token, model.vocab, model.tp)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        logprobs.append(torch.where(done, torch.zeros_like(logprob), logprob))
        masks.append(~done)
        done = done | torch.isin(token, eos)
        if model.ep.all_finished(bool(done.all())) or step + 1 == cfg.max_new_tokens:
            break
        slot = longest + step
        valid[:, slot] = True
        if decode is not None:
            logits = decode(token[:, None], (next_positions + step)[:, None], slot)
            continue
        hidden = model.hidden(token[:, None], (next_positions + step)[:, None],
                              attention_mask(valid[:, :slot + 1], torch.tensor([slot], device=device),
                                             model.sliding_window), cache, slot)
        logits = model.logits(hidden[:, -1])
    return Generation(torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(masks, 1).long())


def completion_ids(generation: Generation, row: int) -> list[int]:
    """The generated tokens of one row, without the padding after EOS."""
    return generation.tokens[row, : int(generation.mask[row].sum())].tolist()

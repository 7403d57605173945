"""DeepSpeed-Chat's inference mechanism, the baseline of `bench rlhf` and `bench generate`: no
reallocation, the model function calls run on the (ZeRO-3) training or frozen engines themselves.

Generation gathers the whole ZeRO-3 model once on every rank (`GatheredParameters` over every
parameter - what DeepSpeed's hybrid engine does outside its tensor-parallel path, and TRL's
`unwrap_model_for_generation(ds3_gather_for_generation=True)`), then runs HF `generate`; reference,
reward and critic scoring are plain ZeRO-3 forwards (every layer all-gathered as it runs). The
same interface as `models.inference.InferenceCall`, so the algorithms' interfaces do not know which
mechanism serves them; the log-probs are the policy's (`models.generate.Generation`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from ds_realloc.models.attention import positions_of
from ds_realloc.models.generate import Generation, GenerationConfig, left_padded, policy_temperature
from ds_realloc.models.value_head import hf_model_of
from ds_realloc.ops import next_token_logprobs
from ds_realloc.utils.dist import comm_device


def _parameter_offload(engine):
    """The object that owns a ZeRO-3 engine's module hooks (DeepSpeedZeRoOffload), or None."""
    optimizer = getattr(engine, "optimizer", None)
    return getattr(optimizer, "parameter_offload", optimizer) if optimizer is not None else None


@contextlib.contextmanager
def gathered(module: nn.Module, engine=None) -> Iterator[None]:
    """Every parameter of a ZeRO-3 module whole on this rank for the block (a no-op for replicas),
    with the engine's per-module ZeRO-3 hooks removed meanwhile, as TRL's
    `unwrap_model_for_generation(ds3_gather_for_generation=True)` does: otherwise each decoding step's
    forward would release and re-fetch the layers like ordinary ZeRO-3 inference."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    offload = _parameter_offload(engine)
    with deepspeed.zero.GatheredParameters(params):
        if offload is None or not hasattr(offload, "forward_hooks"):
            yield
            return
        for param in params:
            param.ds_active_sub_modules.clear()
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # hooks back (the trace re-records)


def hf_generate(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                eos_token_ids: Sequence[int], pad_token_id: int, synced_gpus: bool = False) -> Generation:
    """HF `generate` with our sampling settings, as a `Generation` (pad after EOS, the policy's
    log-probs of the chosen tokens from the unprocessed logits)."""
    from transformers import GenerationConfig as HFGenerationConfig

    ids, mask = left_padded(prompts, pad_token_id)
    device = comm_device()
    config = HFGenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                                do_sample=not cfg.greedy, temperature=cfg.temperature if not cfg.greedy else None,
                                top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None,
                                eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id, use_cache=True,
                                return_dict_in_generate=True, output_logits=True)
    torch.manual_seed(cfg.seed)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         synced_gpus=synced_gpus)
    tokens = out.sequences[:, ids.shape[1]:].cpu()
    logits = torch.stack(out.logits, 1).float().cpu()  # [B, N, V], before any logits processor
    logprobs = torch.log_softmax(logits / policy_temperature(cfg), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ended = torch.isin(tokens, torch.tensor(list(eos_token_ids)))
    after_eos = (ended.cumsum(1) - ended.long()) > 0  # strictly after the first EOS
    tokens = tokens.masked_fill(after_eos, pad_token_id)
    return Generation(tokens, logprobs.masked_fill(after_eos, 0.0), (~after_eos).long())


class ZeroInferenceCall:
    """A generate / inference MFC served by a (ZeRO-3) engine's own module (see the module docstring);
    `engine` is the DeepSpeed engine that owns the module's ZeRO-3 hooks (None for a replica)."""

    def __init__(self, module: nn.Module, engine=None):
        self.module, self.engine = module, engine
        self.device = comm_device()

    def generate(self, prompts, cfg: GenerationConfig, eos_token_ids, pad_token_id) -> Generation:
        model = hf_model_of(self.module)
        with torch.no_grad(), gathered(model, self.engine):
            return hf_generate(model, prompts, cfg, eos_token_ids, pad_token_id)

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last: int | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
        keep = input_ids.shape[1] if last is None else last + 1
        logits = self.module(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                             position_ids=positions_of(attention_mask).to(self.device), logits_to_keep=keep,
                             use_cache=False).logits
        logits = logits / temperature if temperature != 1.0 else logits  # as the policy loss scores them
        return next_token_logprobs(logits, input_ids[:, -keep:].to(self.device))[0]

    @torch.no_grad()
    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                           position_ids=positions_of(attention_mask).to(self.device))

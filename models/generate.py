"""Sampling: class prefix -> H*W image tokens through the GPT's static KV cache.

A straight line: allocate caches, prefill the class prefix (with classifier-free guidance the batch is doubled:
real labels, then the null class), then one cached decode step per token, each followed by guided, filtered
sampling. Sampling state lives on the device (the ``generator``), so the loop has no host synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) all but the ``top_k`` largest logits and outside the smallest set of tokens whose
    probability reaches ``top_p``; 0 / 1.0 switch a filter off. ``logits`` (B, V) fp32."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens strictly before it already reach top_p (the first one always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) int64 tokens. temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, labels: torch.Tensor, *, cfg_scale: float, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample ``H*W`` image tokens per label.

    Arguments:
        model: a :class:`models.gpt.GPT` (put in eval mode here; its caches are (re)allocated).
        labels: ``(B,)`` int64 class labels.
        cfg_scale: classifier-free guidance scale; ``> 1`` doubles the batch (cond + null class) and samples from
            ``uncond + cfg_scale * (cond - uncond)``; ``1`` samples the conditional model alone.
        temperature, top_k, top_p: sampling filters (LlamaGen defaults: 1.0, off, off); temperature 0 = greedy.
        generator: the random stream (a ``torch.Generator`` on the model's device) for reproducible samples.
    Return:
        tokens: ``(B, H*W)`` int64, raster order.
    """
    model.eval()
    config = model.config
    device = model.output.weight.device
    labels = labels.to(device)
    guided = cfg_scale > 1.0
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    batch = cond.shape[0]
    model.setup_caches(batch)
    cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    def guide(logits):
        if not guided:
            return logits
        cond_logits, uncond_logits = logits.chunk(2)
        return uncond_logits + cfg_scale * (cond_logits - uncond_logits)

    logits = model.decode_step(None, cond, cache_seqlens)
    cache_seqlens += config.cls_token_num
    tokens = torch.empty(labels.shape[0], config.block_size, dtype=torch.long, device=device)
    for i in range(config.block_size):
        tokens[:, i] = sample_next(guide(logits), temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)
        if i + 1 == config.block_size:
            break
        step_tokens = tokens[:, i: i + 1].repeat(2, 1) if guided else tokens[:, i: i + 1]
        logits = model.decode_step(step_tokens, None, cache_seqlens)
        cache_seqlens += 1
    model.clear_caches()
    return tokens

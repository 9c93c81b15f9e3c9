"""Dual (causal + bidirectional) attention in plain PyTorch: the specification the fast backends are held to.

For queries ``q`` and keys/values ``k, v`` in ``(batch, seqlen, nheads, head_dim)`` layout and scores
``s_ij = softmax_scale * q_i . k_j``:

* the causal output row ``i`` is ``softmax_{j <= i}(s_ij) @ v`` with log-sum-exp ``lse_c[i] = logsumexp_{j <= i} s_ij``;
* the bidirectional output row ``i`` is ``softmax_{all j}(s_ij) @ v`` with ``lse_b[i] = logsumexp_j s_ij``.

This is simply two ordinary attentions; the fast backends get both from one pass over the keys (docs/method.md,
"The shared bidirectional pass"). Grouped K/V (``nheads_k`` dividing ``nheads``) maps query head ``h`` to K/V head
``h // (nheads // nheads_k)``, as FlashAttention does. Gradients come from PyTorch autograd.
"""

from __future__ import annotations

import math

import torch

from .attention import masked_attention

OUTPUTS = ("both", "causal", "bidirectional")


def dual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    outputs: str = "both",
):
    """Returns ``(out_causal, out_bidir, lse_causal, lse_bidir)``; entries for an output not requested are None.

    Computes in the inputs' precision, at least fp32. Outputs are in the inputs' dtype ``(batch, seqlen, nheads,
    head_dim)``; LSEs are ``(batch, nheads, seqlen)`` in the compute dtype (fp32, or fp64 for fp64 inputs)."""
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
    compute = torch.promote_types(q.dtype, torch.float32)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[2] // k.shape[2]
    qh = q.to(compute).transpose(1, 2)  # (B, H, S, D)
    kh = k.to(compute).transpose(1, 2).repeat_interleave(groups, dim=1)
    vh = v.to(compute).transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = softmax_scale * (qh @ kh.transpose(-1, -2))  # (B, H, S, S)
    seqlen = q.shape[1]
    out_c = out_b = lse_c = lse_b = None
    # Non-finite inputs: mirai_kernels.reference.attention (a future key or value never reaches a causal row; a
    # row whose visible scores are all -inf is zero with lse -inf).
    if outputs in ("both", "causal"):
        past = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
        out_c, lse_c = masked_attention(scores, past, vh)
        out_c = out_c.transpose(1, 2).contiguous().to(q.dtype)
    if outputs in ("both", "bidirectional"):
        every = torch.ones(1, 1, dtype=torch.bool, device=q.device)
        out_b, lse_b = masked_attention(scores, every, vh)
        out_b = out_b.transpose(1, 2).contiguous().to(q.dtype)
    return out_c, out_b, lse_c, lse_b

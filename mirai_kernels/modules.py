"""``nn.Module`` wrappers over the public functional API."""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backend as _backend
from .ops.decode import decode_attention as _decode_attention
from .ops.dual_attention import dual_attention as _dual_attention
from .ops.foresight import fused_linear_cosine_loss as _fused_linear_cosine_loss
from .ops.foresight import parse_offsets as _parse_offsets
from .ops.rope import apply_rope_2d, rope_2d_table


class Rope2D(nn.Module):
    """LlamaGen's 2D RoPE as a module holding its table (a non-persistent buffer: it moves with ``.to()`` and is
    rebuilt, not loaded, so checkpoints stay LlamaGen-compatible).

    ``forward(x, positions=None)`` with x ``(batch, seqlen, nheads, head_dim)``; see :func:`apply_rope_2d`.
    """

    def __init__(self, grid, head_dim: int, prefix: int = 1, base: float = 10000.0, backend: Optional[str] = None):
        super().__init__()
        self.grid, self.head_dim, self.prefix, self.base, self.backend = grid, head_dim, prefix, base, backend
        self.register_buffer("table", rope_2d_table(grid, head_dim, prefix, base), persistent=False)

    def _apply(self, fn, recurse=True):
        # ``.to(bfloat16)`` / ``.half()`` cast floating buffers, but the table must stay fp32 (apply_rope_2d requires
        # it): a cast table is rebuilt exactly in fp32 on its new device, never upcast from the rounded copy.
        super()._apply(fn, recurse)
        if self.table.dtype != torch.float32 and self.table.device.type != "meta":
            self._buffers["table"] = rope_2d_table(self.grid, self.head_dim, self.prefix, self.base,
                                                   device=self.table.device)
        return self

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        return apply_rope_2d(x, self.table, positions, backend=self.backend)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, head_dim={self.head_dim}, prefix={self.prefix}, base={self.base}"


# ---------------------------------------------------------------------------------------------------------
# Foresight heads (docs/method.md, "Foresight loss")
# ---------------------------------------------------------------------------------------------------------


class _SiluBmm(torch.autograd.Function):
    """``out[k] = silu(a[k]) @ w[k].T + b[k]`` for the K foresight heads in one batched GEMM. Saves the
    pre-activation ``a`` only and recomputes the SiLU in backward (an elementwise pass, no GEMM), so the activation
    is never stored. ``a``: ``(B, N, K, h_in)`` view with unit last stride; returns ``(B, N, K, h_out)`` as a view of
    a ``(K, B, N, h_out)`` buffer."""

    @staticmethod
    def forward(ctx, a, w, b):
        batch, seqlen, n_heads, h_in = a.shape
        a_k = a.permute(2, 0, 1, 3).reshape(n_heads, batch * seqlen, h_in)
        out = torch.baddbmm(b.unsqueeze(1), torch.nn.functional.silu(a_k), w.transpose(1, 2))
        ctx.save_for_backward(a, w)
        return out.view(n_heads, batch, seqlen, -1).permute(1, 2, 0, 3)

    @staticmethod
    def backward(ctx, grad):
        a, w = ctx.saved_tensors
        batch, seqlen, n_heads, h_in = a.shape
        a_k = a.permute(2, 0, 1, 3).reshape(n_heads, batch * seqlen, h_in)
        g = grad.permute(2, 0, 1, 3).reshape(n_heads, batch * seqlen, -1)
        grad_a = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # Written in a's own layout (the first layer's (B, N, K, h) output), so the Linear's backward before
            # it reshapes for free.
            grad_a = torch.empty_like(a, memory_format=torch.preserve_format)
            grad_a_k = grad_a.permute(2, 0, 1, 3).reshape(n_heads, batch * seqlen, h_in)
            if grad_a_k._base is grad_a:
                torch.ops.aten.silu_backward.grad_input(torch.bmm(g, w), a_k, grad_input=grad_a_k)
            else:  # a's layout does not merge (B, N): any layout will do
                grad_a = torch.ops.aten.silu_backward(torch.bmm(g, w), a_k)
                grad_a = grad_a.view(n_heads, batch, seqlen, h_in).permute(1, 2, 0, 3)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g.transpose(1, 2), torch.nn.functional.silu(a_k))
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(1)
        return grad_a, grad_w, grad_b


class _HeadsGradsInForward(torch.autograd.Function):
    """The whole K-head MLP + loss with every gradient computed in the forward pass (the fused op's pattern, carried
    through the trunk) by one C++ op, ``mirai::foresight_heads`` (csrc/foresight_heads.cpp: its schedule is
    described there). Nothing of the trunk is saved: only the gradients (``grad_h`` and the parameter gradients)
    and, for the fallback below, ``h`` and the parameters (which autograd keeps alive anyway).

    Why (measured, ``benchmarks/foresight_bench.py``): autograd would save each layer's pre-activation and the fused
    op's input gradient, recompute a SiLU in backward, and run one Python node per layer; here each SiLU and its
    derivative are computed once, every pass between GEMMs runs on a block still in cache, and no activation
    outlives the forward pass.

    The gradients are computed for the expected upstream (``d total / d per_head = head_weights``). Backward returns
    them when the real upstream is that, scales them once when it is a common multiple of it for every head (the
    trainer's ``scale * total``), and otherwise — a per-head upstream that is not proportional, or double
    backward — recomputes the heads with autograd (``recompute_fn``) and backpropagates the real upstream: exact
    for any upstream, slow only there. CPU eager only (reading the upstream there costs no device sync)."""

    @staticmethod
    def forward(ctx, meta, h, targets, *params):
        (op, tpos, grad_scale, expected, recompute_fn) = meta
        needs = ctx.needs_input_grad
        grad_mask = [int(needs[1])] + [int(need) for need in needs[3:]]
        per_head, grad_h, grad_w, grad_b = op(h, targets, tpos, list(params[0::2]), list(params[1::2]), grad_mask,
                                              grad_scale)
        grad_h = grad_h if needs[1] else None
        grads = [g if flag else None for g, flag in zip((x for pair in zip(grad_w, grad_b) for x in pair),
                                                        grad_mask[1:])]
        ctx.expected = expected
        ctx.recompute_fn = recompute_fn
        ctx.n_grads = len(params)
        have = [t for t in [grad_h] + grads if t is not None]
        ctx.have = [t is not None for t in [grad_h] + grads]
        ctx.save_for_backward(h, *params, *have)
        return per_head

    @staticmethod
    def backward(ctx, grad_per_head):
        saved = ctx.saved_tensors
        n = ctx.n_grads
        h, params, have = saved[0], saved[1:1 + n], list(saved[1 + n:])
        grads = [have.pop(0) if flag else None for flag in ctx.have]
        ratio = None
        if not torch.is_grad_enabled() and _eager_cpu(grad_per_head):
            ratio = grad_per_head.double() / torch.tensor(ctx.expected, dtype=torch.float64)
            ratio = float(ratio[0]) if bool((ratio == ratio[0]).all()) else None
        if ratio is None:  # a per-head upstream or double backward: recompute with autograd, exact for any upstream
            create = torch.is_grad_enabled()
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(need) for t, need in
                          zip((h, *params), (ctx.needs_input_grad[1],) + ctx.needs_input_grad[3:])]
                per_head = ctx.recompute_fn(leaves[0], leaves[1:])
                wanted = [t for t in leaves if t.requires_grad]
                got = iter(torch.autograd.grad(per_head, wanted, grad_per_head, create_graph=create,
                                               allow_unused=True))
                grads = [next(got) if t.requires_grad else None for t in leaves]
        elif ratio != 1.0:
            grads = [None if g is None else g * ratio for g in grads]
        return (None, grads[0], None, *grads[1:])


def _eager_cpu(t: torch.Tensor) -> bool:
    from .ops.foresight import _eager_cpu as check

    return check(t)


class ForesightHeads(nn.Module):
    """Mirai's K foresight heads (REPA-style projector MLPs) and their loss, as one module.

    Head ``k`` is ``Linear(d_model -> hidden) SiLU [Linear(hidden -> hidden) SiLU] x (depth - 2)
    Linear(hidden -> z_dim)`` (``depth = 1``: a single ``Linear(d_model -> z_dim)``), initialised N(0, 0.02) with
    zero biases, as the paper's projector. The K heads run together:

    * the first layer of all heads is **one GEMM** ``(B*N, d_model) x (d_model, K*hidden)`` (they share their
      input ``h``);
    * the middle layers are one batched GEMM over the heads each, whose SiLU is applied to the stored
      pre-activation and recomputed in backward (the activation is never stored);
    * the last layer is :func:`mirai_kernels.fused_linear_cosine_loss` with ``input_activation="silu"``: the last
      SiLU and the ``(B, N, K, z_dim)`` projections exist only chunk by chunk, and only the input gradient is kept;
    * ``recompute=True`` checkpoints everything before the last layer (only ``h`` is kept; the trunk runs twice).

    On CPU (C++ face, eager mode, depth >= 2, ``recompute=False``, and more saved activation values than parameters:
    B*N*K*hidden*(depth-1) + K*z_dim*hidden >= parameters + B*N*d_model) the whole module runs as one autograd node
    whose gradients are all computed in the forward pass by one C++ op (:class:`_HeadsGradsInForward`): same GEMMs
    as single-threaded tasks over heads and row / column blocks, each SiLU and its derivative computed once, no
    activation saved. It keeps its work buffers between calls up to ``MIRAI_CPU_WORKSPACE_MB`` (default 1024 MiB;
    0 keeps none).

    Parameters: ``weight_in (K*hidden, d_model)``, ``bias_in (K*hidden,)`` (rows ``k*hidden:(k+1)*hidden`` are head
    k's), ``weights_mid[i] (K, hidden, hidden)``, ``biases_mid[i] (K, hidden)``, ``weight_out (K, z_dim, hidden)``,
    ``bias_out (K, z_dim)``; each slice is the corresponding ``nn.Linear``'s ``weight`` / ``bias``.

    ``forward(h, targets)`` → ``(total, per_head)``:
        h: ``(B, N, d_model)`` student hidden state (LlamaGen: the raw residual stream after block l).
        targets: ``(B, N, z_dim)`` indexed like the sequence (see :func:`mirai_kernels.foresight_cosine_loss`);
            detached and cast to the compute dtype (the fp32 teacher state under bf16 autocast).
        Returns the :func:`~mirai_kernels.foresight_cosine_loss` pair: ``total = sum_k λ_k per_head[k]``.
    Under ``torch.autocast`` the heads compute in the autocast dtype.

    Presets (docs/method.md, "The official recipe"):
        * :meth:`mirai_e` — Mirai-E: offsets ``{0, 1, W}`` (same cell, right, below; ``{0, 1, 16}`` on 16x16),
          λ = 2 each, raster boundary (paper-exact row wrap), prefix aligned, ``z_dim = d_model`` (the EMA teacher's
          layer-l state).
        * :meth:`mirai_i` — Mirai-I: offset ``{0}``, λ = 2, prefix not aligned (``grid_to_sequence`` targets),
          ``z_dim = 768`` (DINOv2 ViT-B/14).
    """

    def __init__(self, d_model: int, z_dim: int, offsets, *, grid, prefix: int = 1, boundary: str = "raster",
                 align_prefix: bool = True, head_weights=None, hidden: int = 2048, depth: int = 3,
                 recompute: bool = False, backend: Optional[str] = None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"ForesightHeads: depth must be >= 1, got {depth}")
        if grid is None:
            raise ValueError("ForesightHeads: grid=(H, W) is required")
        parsed = _parse_offsets(offsets, grid)  # validates early, with the op's messages
        n_heads = len(parsed)
        if head_weights is not None and len(head_weights) != n_heads:
            raise ValueError(f"ForesightHeads: head_weights has {len(head_weights)} entries for {n_heads} heads")
        self.d_model, self.z_dim, self.hidden, self.depth, self.n_heads = d_model, z_dim, hidden, depth, n_heads
        self.offsets = [tuple(o) if isinstance(o, (list, tuple)) else int(o) for o in
                        (offsets if isinstance(offsets, (list, tuple)) else [offsets])]
        self.grid, self.prefix, self.boundary, self.align_prefix = grid, prefix, boundary, align_prefix
        self.head_weights = None if head_weights is None else [float(w) for w in head_weights]
        self.recompute, self.backend = recompute, backend
        last_in = d_model if depth == 1 else hidden
        if depth >= 2:
            self.weight_in = nn.Parameter(torch.empty(n_heads * hidden, d_model))
            self.bias_in = nn.Parameter(torch.zeros(n_heads * hidden))
        self.weights_mid = nn.ParameterList(
            [nn.Parameter(torch.empty(n_heads, hidden, hidden)) for _ in range(max(0, depth - 2))]
        )
        self.biases_mid = nn.ParameterList(
            [nn.Parameter(torch.zeros(n_heads, hidden)) for _ in range(max(0, depth - 2))]
        )
        self.weight_out = nn.Parameter(torch.empty(n_heads, z_dim, last_in))
        self.bias_out = nn.Parameter(torch.zeros(n_heads, z_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if "bias" in name:
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    @classmethod
    def mirai_e(cls, d_model: int, *, grid=(16, 16), **kwargs) -> "ForesightHeads":
        """Mirai-E preset: offsets (0, 0), (0, 1), (1, 0) = {0, 1, 16} on 16x16, λ = 2 each, z_dim = d_model."""
        kwargs.setdefault("head_weights", [2.0, 2.0, 2.0])
        return cls(d_model, kwargs.pop("z_dim", d_model), [(0, 0), (0, 1), (1, 0)], grid=grid, **kwargs)

    @classmethod
    def mirai_i(cls, d_model: int, z_dim: int = 768, *, grid=(16, 16), **kwargs) -> "ForesightHeads":
        """Mirai-I preset: offset 0, λ = 2, prefix not aligned, z_dim = 768 (DINOv2 ViT-B/14 patch tokens)."""
        kwargs.setdefault("head_weights", [2.0])
        kwargs.setdefault("align_prefix", False)
        return cls(d_model, z_dim, [0], grid=grid, **kwargs)

    def _trunk(self, h: torch.Tensor, *params) -> torch.Tensor:
        """Pre-activation of the last SiLU, ``(B, N, K, hidden)``; params: w_in, b_in, (w_mid, b_mid)*."""
        batch, seqlen, _ = h.shape
        a = torch.nn.functional.linear(h, params[0], params[1]).view(batch, seqlen, self.n_heads, self.hidden)
        for i in range(self.depth - 2):
            if a.numel() == 0:
                # Empty batch: _SiluBmm's (K, B*N, -1) reshapes are ambiguous on zero rows; this plain form gives the
                # same empty activation and exact zero gradients.
                w, b = params[2 + 2 * i], params[3 + 2 * i]
                a = torch.einsum("bnki,koi->bnko", torch.nn.functional.silu(a), w) + b
            else:
                a = _SiluBmm.apply(a, params[2 + 2 * i], params[3 + 2 * i])
        return a

    def forward(self, h: torch.Tensor, targets: torch.Tensor):
        if h.dim() != 3 or h.shape[-1] != self.d_model:
            raise ValueError(f"ForesightHeads: h must be (B, N, d_model={self.d_model}), got {tuple(h.shape)}")
        dtype = h.dtype
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
        with torch.autocast(h.device.type, enabled=False):
            h = h.to(dtype)
            targets = targets.detach().to(dtype)
            w_out, b_out = self.weight_out.to(dtype), self.bias_out.to(dtype)
            kw = dict(grid=self.grid, prefix=self.prefix, boundary=self.boundary, align_prefix=self.align_prefix,
                      head_weights=self.head_weights, backend=self.backend)
            if self.depth == 1:
                x = h.unsqueeze(2).expand(-1, -1, self.n_heads, -1)
                return _fused_linear_cosine_loss(x, w_out, b_out, targets, self.offsets, **kw)
            params = [self.weight_in.to(dtype), self.bias_in.to(dtype)]
            for w, b in zip(self.weights_mid, self.biases_mid):
                params += [w.to(dtype), b.to(dtype)]
            fast = self._grads_in_forward(h, targets, params + [w_out, b_out], kw)
            if fast is not None:
                return fast
            if self.recompute and torch.is_grad_enabled():
                a = torch.utils.checkpoint.checkpoint(self._trunk, h, *params, use_reentrant=False)
            else:
                a = self._trunk(h, *params)
            return _fused_linear_cosine_loss(a, w_out, b_out, targets, self.offsets, input_activation="silu", **kw)

    def _autograd_heads(self, h, targets, params, kw):
        """The trunk + fused last layer through autograd (the fallback of :class:`_HeadsGradsInForward`)."""
        a = self._trunk(h, *params[:-2])
        return _fused_linear_cosine_loss(a, params[-2], params[-1], targets, self.offsets, input_activation="silu",
                                         **kw)

    def _grads_in_forward(self, h, targets, params, kw):
        """``(total, per_head)`` from :class:`_HeadsGradsInForward`, or None where it does not apply: depth 1 (the
        fused op alone already is that), ``recompute=True`` (its own memory trade), more parameters than saved
        activations (below), no gradient wanted, the reference face, an empty input, or off CPU eager
        mode (there reading the upstream gradient would cost a device sync; those keep the autograd path). CPU means the
        C++ face (interpreted Triton is a correctness tool, and keeps its own door's checks)."""
        from .ops import _pairing
        from .ops import foresight as fops
        from .reference import foresight as _reference_foresight

        if self.depth < 2 or self.recompute or not torch.is_grad_enabled() or not (h.requires_grad or any(p.requires_grad
                                                                                          for p in params)):
            return None
        if h.device.type != "cpu" or torch.compiler.is_compiling() or not fops._eager_cpu(h):
            return None
        face = _backend.select_face(fops.FUSED_OP.name, h.device, self.backend)
        if face != "cpp" or h.numel() == 0 or targets.numel() == 0 or self.z_dim == 0 or self.hidden == 0:
            return None
        batch, seqlen, _ = h.shape
        if tuple(targets.shape) != (batch, seqlen, self.z_dim):
            return None  # the fused op's door raises with its message
        # Memory rule: this path keeps every parameter gradient from the forward pass on, the autograd path keeps
        # (depth - 1) (B*N, K, hidden) activations and the last weight's gradient. Take the one that keeps less:
        # few rows and wide heads (GPT-B widths at batch 2: 22M parameters vs 11M saved values) stay on autograd.
        rows, k, hid = batch * seqlen, self.n_heads, self.hidden
        kept_here = sum(p.numel() for p in params) + rows * self.d_model
        kept_autograd = rows * k * hid * (self.depth - 1) + k * self.z_dim * hid
        if kept_here > kept_autograd:
            return None
        grid, parsed = fops._check_pairing("ForesightHeads", seqlen, self.n_heads, self.grid, self.offsets,
                                           self.prefix, self.boundary, self.head_weights)
        tpos = _pairing.pairing_table(seqlen, grid, parsed, self.prefix, self.boundary, self.align_prefix, h.device)
        counts = _pairing.pair_counts(seqlen, grid, parsed, self.prefix, self.boundary, self.align_prefix)
        weights = self.head_weights or [1.0] * self.n_heads
        # As the fused op: the gradients are made for upstream `weights` (a zero weight: 1, so they are not zero).
        expected = [float(w) if float(w) != 0.0 else 1.0 for w in weights]
        grad_scale = [e / max(1, batch * c) for e, c in zip(expected, counts)]
        op = fops.HEADS_OP.op(face)

        def recompute_fn(h_leaf, param_leaves):
            return self._autograd_heads(h_leaf, targets, param_leaves, kw)[1]

        meta = (op, tpos, grad_scale, expected, recompute_fn)
        per_head = _HeadsGradsInForward.apply(meta, h, targets, *params)
        return _reference_foresight.weighted_total(per_head, self.head_weights), per_head

    def head_mlps(self) -> list:
        """The K heads as separate ``nn.Sequential`` MLPs sharing nothing (copies of this module's weights), the
        paper code's layout: for checks and the eager baseline."""
        mlps = []
        fk = dict(device=self.weight_out.device, dtype=self.weight_out.dtype)
        for k in range(self.n_heads):
            if self.depth == 1:
                layers = [nn.Linear(self.d_model, self.z_dim, **fk)]
                layers[0].weight.data.copy_(self.weight_out[k])
                layers[0].bias.data.copy_(self.bias_out[k])
            else:
                first = nn.Linear(self.d_model, self.hidden, **fk)
                first.weight.data.copy_(self.weight_in[k * self.hidden:(k + 1) * self.hidden])
                first.bias.data.copy_(self.bias_in[k * self.hidden:(k + 1) * self.hidden])
                layers = [first, nn.SiLU()]
                for w, b in zip(self.weights_mid, self.biases_mid):
                    mid = nn.Linear(self.hidden, self.hidden, **fk)
                    mid.weight.data.copy_(w[k])
                    mid.bias.data.copy_(b[k])
                    layers += [mid, nn.SiLU()]
                last = nn.Linear(self.hidden, self.z_dim, **fk)
                last.weight.data.copy_(self.weight_out[k])
                last.bias.data.copy_(self.bias_out[k])
                layers.append(last)
            mlps.append(nn.Sequential(*layers))
        return mlps

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, z_dim={self.z_dim}, offsets={self.offsets}, grid={self.grid}, "
                f"prefix={self.prefix}, boundary={self.boundary!r}, align_prefix={self.align_prefix}, "
                f"head_weights={self.head_weights}, hidden={self.hidden}, depth={self.depth}, "
                f"recompute={self.recompute}")


# ---------------------------------------------------------------------------------------------------------
# Foresight attention (docs/method.md, "The shared bidirectional pass")
# ---------------------------------------------------------------------------------------------------------


class ForesightAttention(nn.Module):
    """LlamaGen's ``Attention`` (fused ``wqkv``, 2D RoPE, ``wo``, residual dropout) running through
    :func:`mirai_kernels.dual_attention` (training / full forward, which can also return the bidirectional output
    from the same call) and :func:`mirai_kernels.decode_attention` (KV-cache decoding).

    A drop-in for LlamaGen's ``Attention`` inside LlamaGen's own ``TransformerBlock``:

    * constructor: ``ForesightAttention(config)`` with a LlamaGen ``ModelArgs``-like object (``dim``, ``n_head``,
      ``n_kv_head``, ``attn_dropout_p``, ``resid_dropout_p``; missing dropouts mean 0), or the fields
      ``ForesightAttention(dim, n_head, n_kv_head=None, attn_dropout_p=0.0, resid_dropout_p=0.0)``;
    * parameters keep LlamaGen's names and shapes, so its weights load strictly: ``wqkv.weight``
      ``((n_head + 2 * n_kv_head) * head_dim, dim)`` (rows: q heads, then k heads, then v heads) and
      ``wo.weight`` ``(dim, dim)``, no biases. Grouped K/V (``n_kv_head`` dividing ``n_head``) maps query head
      ``h`` to K/V head ``h // (n_head // n_kv_head)``, as LlamaGen's ``repeat_interleave``;
    * ``kv_cache`` attribute (None until a cache is set), as LlamaGen's: ``setup_caches`` assigns it.

    ``forward(x, freqs_cis, input_pos=None, mask=None, *, cache_seqlens=None, bidirectional=False,
    bidirectional_grad=True)``:
        x: ``(batch, seqlen, dim)``.
        freqs_cis: RoPE table rows ``(rows, head_dim/2, 2)`` (from :func:`mirai_kernels.rope_2d_table`, or
            LlamaGen's ``freqs_cis``; a leading 1 as LlamaGen's uncached eval forward passes is accepted). Without
            ``cache_seqlens`` rows ``0 .. seqlen-1`` rotate the tokens (LlamaGen passes the rows of the tokens it
            feeds: ``freqs_cis[:seqlen]`` in training, ``freqs_cis[input_pos]`` when decoding). With
            ``cache_seqlens`` it is the whole table (rows picked by absolute position inside the kernel).
        input_pos, mask: **LlamaGen's KV-cache protocol** (used when ``kv_cache`` is set and ``input_pos`` given):
            ``input_pos`` ``(seqlen,)`` the positions of the new tokens, one for the whole batch (consecutive);
            ``kv_cache`` LlamaGen's cache object: heads-first ``(max_batch, n_kv_head, max_seqlen, head_dim)``
            buffers behind ``update(input_pos, k, v) -> (k_cache, v_cache)``, which this call performs (rotated
            keys, as LlamaGen stores them); attention then runs in ``decode_attention`` over the cache (no copy:
            a BSHD view of the heads-first buffers). ``mask`` is LlamaGen's boolean causal mask sliced at
            ``input_pos`` (``(batch, 1, seqlen, max_seqlen)``, True = visible). On CPU (and on GPU under
            ``MIRAI_DEBUG=1``) the mask and positions are checked; a mask that is not the causal one (LlamaGen's
            t2i padding masks) is honoured by a plain ``scaled_dot_product_attention`` instead. On GPU without
            debug checks the mask is taken to be causal (no host sync). Without a cache, a given ``mask``
            (boolean or additive) also goes to SDPA.
        cache_seqlens: **our per-row protocol** (``models.nets.gpt``, speculative decoding): int32 ``(batch,)`` cache
            lengths before this call's tokens; ``kv_cache`` holds BSHD ``k``/``v`` buffers
            ``(max_batch, max_seqlen, n_kv_head, head_dim)``; the new keys/values are appended in place by the
            decode kernel (which also applies the RoPE). The caller advances ``cache_seqlens``.
        bidirectional: (not with a cache) also return the bidirectional-attention output (every token sees the
            whole sequence): the Mirai extension.
        bidirectional_grad: with ``bidirectional=True``, False makes the bidirectional output a stop-gradient
            target: it carries no gradient (neither to the inputs nor to ``wo``) and costs nothing in backward.
    Returns ``wo(attn)`` after residual dropout, ``(batch, seqlen, dim)``; with ``bidirectional=True`` the pair
    ``(out_causal, out_bidir)``, both after ``wo`` (one GEMM for the two when both carry gradients) and dropout.

    ``attn_dropout_p`` > 0 in training mode has no fused kernel: that case runs two
    ``F.scaled_dot_product_attention`` calls with dropout (LlamaGen's training configs keep it at 0).
    Cached decoding is inference only (``decode_attention`` raises under grad mode with inputs requiring grad).
    """

    def __init__(self, dim, n_head: Optional[int] = None, n_kv_head: Optional[int] = None,
                 attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0, *, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(dim, numbers.Integral):  # LlamaGen's ForesightAttention(config) / Attention(config)
            config = dim
            if n_head is not None or n_kv_head is not None:
                raise TypeError("ForesightAttention: pass a config object or the fields (dim, n_head, ...), not both")
            if not (hasattr(config, "dim") and hasattr(config, "n_head")):
                raise TypeError(f"ForesightAttention: expected an int dim or a config with dim and n_head fields "
                                f"(LlamaGen's ModelArgs), got {type(config).__name__}")
            dim, n_head = config.dim, config.n_head
            n_kv_head = getattr(config, "n_kv_head", None)
            attn_dropout_p = getattr(config, "attn_dropout_p", 0.0)
            resid_dropout_p = getattr(config, "resid_dropout_p", 0.0)
        if n_head is None:
            raise TypeError("ForesightAttention: n_head is required with an int dim")
        dim, n_head = int(dim), int(n_head)
        if n_head <= 0 or dim <= 0 or dim % n_head:
            raise ValueError(f"ForesightAttention: dim {dim} must be divisible by n_head {n_head}")
        n_kv_head = n_head if n_kv_head is None else int(n_kv_head)
        if n_kv_head <= 0 or n_head % n_kv_head:
            raise ValueError(f"ForesightAttention: n_kv_head {n_kv_head} must divide n_head {n_head}")
        self.dim, self.n_head, self.n_kv_head = dim, n_head, n_kv_head
        self.head_dim = dim // n_head
        self.kv_dim = n_kv_head * self.head_dim
        self.wqkv = nn.Linear(dim, dim + 2 * self.kv_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.kv_cache = None
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)
        self.backend = backend

    # -- projections ------------------------------------------------------------------------------------

    def _split_qkv(self, x: torch.Tensor):
        batch, seqlen, _ = x.shape
        qkv = self.wqkv(x).view(batch, seqlen, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q = qkv[:, :, : self.n_head]
        k = qkv[:, :, self.n_head : self.n_head + self.n_kv_head]
        v = qkv[:, :, self.n_head + self.n_kv_head :]  # a strided view: the kernels read it in place
        return q, k, v

    @staticmethod
    def _table(freqs_cis: Optional[torch.Tensor], head_dim: int) -> torch.Tensor:
        if freqs_cis is None:
            raise ValueError("ForesightAttention: freqs_cis (the RoPE table rows) is required")
        if freqs_cis.dim() == 4 and freqs_cis.shape[0] == 1:  # LlamaGen's uncached eval: freqs_cis[None]
            freqs_cis = freqs_cis[0]
        # LlamaGen keeps its table in fp32; a cast copy would round cos/sin, so only a non-fp32 table is upcast.
        return freqs_cis.float().contiguous()

    def _output(self, attn: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.wo(attn.reshape(*attn.shape[:2], self.dim)))

    def _sdpa(self, q, k, v, mask, causal: bool, dropout_p: float):
        """Plain SDPA on BSHD inputs (dropout, explicit masks): LlamaGen's own computation."""
        group = self.n_head // self.n_kv_head
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal and mask is None,
                                             dropout_p=dropout_p)
        return out.transpose(1, 2)

    # -- protocols -------------------------------------------------------------------------------------

    def _decode_per_row(self, x, table, cache_seqlens):
        cache = self.kv_cache
        if cache is None or not hasattr(cache, "k"):
            raise RuntimeError("ForesightAttention: cache_seqlens needs a BSHD kv_cache with k/v buffers (see "
                               "models.nets.gpt.GPT.setup_caches); LlamaGen's cache object is driven by input_pos")
        batch = x.shape[0]
        q, k, v = self._split_qkv(x)
        out = _decode_attention(q, cache.k[:batch], cache.v[:batch], k, v, cache_seqlens=cache_seqlens,
                                rope_table=table, backend=self.backend)
        return self._output(out)

    def _mask_is_causal(self, mask, input_pos, max_seqlen: int) -> bool:
        """Whether LlamaGen's mask is the plain causal one at consecutive ``input_pos`` (what the decode kernel
        computes). Reads device values, so on GPU only under MIRAI_DEBUG=1; otherwise assumed."""
        if mask is not None and mask.dtype != torch.bool:
            return False
        device = input_pos.device
        if torch.compiler.is_compiling() or (device.type != "cpu" and not _backend.debug_checks()):
            return True
        seqlen = input_pos.shape[0]
        expected_pos = input_pos[:1] + torch.arange(seqlen, device=device)
        if not torch.equal(input_pos.long(), expected_pos.long()):
            raise ValueError(f"ForesightAttention: input_pos must be consecutive positions (one run of new tokens "
                             f"for the whole batch), got {input_pos.tolist()}")
        if mask is None:
            return True
        if mask.shape[-1] != max_seqlen or mask.shape[-2] != seqlen:
            return False
        causal = torch.arange(max_seqlen, device=device)[None, :] <= input_pos.long()[:, None]
        return bool((mask == causal).all())

    def _decode_llamagen(self, x, table, input_pos, mask):
        batch, seqlen, _ = x.shape
        q, k, v = self._split_qkv(x)
        q = apply_rope_2d(q, table, backend=self.backend)
        k = apply_rope_2d(k, table, backend=self.backend)
        k_all, v_all = self.kv_cache.update(input_pos, k.transpose(1, 2), v.transpose(1, 2))
        k_all, v_all = k_all[:batch].transpose(1, 2), v_all[:batch].transpose(1, 2)  # BSHD views, no copy
        q = q.to(k_all.dtype)
        if self._mask_is_causal(mask, input_pos, k_all.shape[1]):
            # The new keys are already in the cache (LlamaGen's update), so the queries are its last rows.
            lengths = (input_pos[-1:] + 1).to(torch.int32).expand(batch).contiguous()
            out = _decode_attention(q, k_all, v_all, cache_seqlens=lengths, backend=self.backend)
        else:
            out = self._sdpa(q, k_all, v_all, mask, causal=False, dropout_p=0.0)
        return self._output(out.to(x.dtype))

    def forward(self, x: torch.Tensor, freqs_cis: Optional[torch.Tensor] = None,
                input_pos: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
                cache_seqlens: Optional[torch.Tensor] = None, bidirectional: bool = False,
                bidirectional_grad: bool = True):
        table = self._table(freqs_cis, self.head_dim)
        cached = cache_seqlens is not None or (self.kv_cache is not None and input_pos is not None)
        if cached and bidirectional:
            raise ValueError("ForesightAttention: bidirectional=True is a training-forward output, not available "
                             "while decoding with a KV cache")
        if cache_seqlens is not None:
            return self._decode_per_row(x, table, cache_seqlens)
        if cached:
            return self._decode_llamagen(x, table, input_pos, mask)

        batch, seqlen, _ = x.shape
        q, k, v = self._split_qkv(x)
        q = apply_rope_2d(q, table, backend=self.backend)
        k = apply_rope_2d(k, table, backend=self.backend)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if mask is not None or dropout_p > 0:
            attn_c = self._sdpa(q, k, v, mask, causal=True, dropout_p=dropout_p)
            attn_b = self._sdpa(q, k, v, None, causal=False, dropout_p=dropout_p) if bidirectional else None
            if attn_b is not None and not bidirectional_grad:
                attn_b = attn_b.detach()
        else:
            attn_c, attn_b = _dual_attention(q, k, v, outputs="both" if bidirectional else "causal",
                                             bidirectional_grad=bidirectional_grad, backend=self.backend)
        if not bidirectional:
            return self._output(attn_c)
        attn_c, attn_b = attn_c.reshape(batch, seqlen, self.dim), attn_b.reshape(batch, seqlen, self.dim)
        if not bidirectional_grad:
            with torch.no_grad():
                out_b = self.resid_dropout(self.wo(attn_b))
            return self.resid_dropout(self.wo(attn_c)), out_b
        out = self.wo(torch.cat([attn_c, attn_b]))  # one GEMM for both outputs
        return self.resid_dropout(out[:batch]), self.resid_dropout(out[batch:])

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
                f"attn_dropout_p={self.attn_dropout_p}")

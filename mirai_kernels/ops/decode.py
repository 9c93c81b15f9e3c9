"""The door of KV-cache decode attention: its declaration, input checks, and the public function.

Declared with :mod:`mirai_kernels.ops._registry`: ``mirai::decode_attention`` carries the compiled backends
(``cpp``: CPU kernel, csrc/decode.cpp; ``cuda``: CUDA kernel, csrc/cuda/decode.cu), ``mirai::decode_attention_triton``
the Triton one; one schema ``(q, k_cache!, v_cache!, k_new, v_new, cache_seqlens, rope_table, softmax_scale,
num_splits) -> out`` (``Tensor(a!) k_cache, Tensor(b!) v_cache``: they append in place) and one fake kernel. The
``reference`` backend is plain PyTorch (:mod:`mirai_kernels.reference.decode`).

Inference only: decode attention has no autograd formula (sampling runs under ``torch.no_grad``/``inference_mode``);
the public function raises if grad mode is on and an input requires grad.

Autocast: no autocast rule; the op computes in fp32 (fp64 for fp64 inputs) and returns ``q``'s dtype. q, caches and
k_new/v_new must share one dtype (a cache is written with the dtype it has).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backend as _backend
from ..reference import decode as _reference
from . import _checks, _registry
from ._checks import describe as _describe


def _triton(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table, softmax_scale, num_splits):
    from ..triton import decode as kernels  # lazy: Triton is optional and reads TRITON_INTERPRET when it decorates

    return kernels.decode_attention(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table, softmax_scale, num_splits
    )


def _fake(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table, softmax_scale, num_splits):
    return q.new_empty(q.shape)  # contiguous, like every backend


OP = _registry.declare(
    "decode_attention",
    faces=("reference", "triton", "cpp", "cuda"),
    fp64_faces=("reference", "cpp"),
    stages={"": _registry.Stage(
        "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new, Tensor? v_new, Tensor cache_seqlens, "
        "Tensor? rope_table, float softmax_scale, SymInt num_splits) -> Tensor",
        triton=_triton, fake=_fake)},
)


# ---------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------


def _check_inputs(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table) -> None:
    where = "decode_attention"
    for name, t, layout in (("q", q, "(batch, seqlen_q, nheads, head_dim)"),
                            ("k_cache", k_cache, "(batch, max_seqlen, nheads_kv, head_dim)"),
                            ("v_cache", v_cache, "(batch, max_seqlen, nheads_kv, head_dim)")):
        _checks.check_rank(where, name, t, layout)
    batch, seqlen_q, nheads, head_dim = q.shape
    _checks.check_float(where, "q", q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{where}: k_cache {_describe(k_cache)} and v_cache {_describe(v_cache)} must have the "
                         "same shape")
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"{where}: caches (batch, max_seqlen, nheads_kv, head_dim) = {_describe(k_cache)} do not "
                         "match "
                         f"q (batch, seqlen_q, nheads, head_dim) = {_describe(q)}")
    nheads_kv = k_cache.shape[2]
    if nheads_kv == 0 or nheads % nheads_kv:
        raise ValueError(f"{where}: nheads ({nheads}) must be a multiple of nheads_kv ({nheads_kv})")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{where}: pass both k_new and v_new, or neither")
    tensors = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, seqlen_q, nheads_kv, head_dim):
                raise ValueError(f"{where}: {name} must be (batch, seqlen_q, nheads_kv, head_dim) = "
                                 f"{(batch, seqlen_q, nheads_kv, head_dim)}, got {_describe(t)}")
        tensors += [("k_new", k_new), ("v_new", v_new)]
    for name, t in tensors:
        if t.dtype != q.dtype:
            raise TypeError(f"{where}: {name} is {t.dtype} but q is {q.dtype}; q, the caches and k_new/v_new must "
                            "share one dtype")
        _checks.check_device(where, name, t, "q", q)
        _checks.check_unit_stride(where, name, t)
    if not isinstance(cache_seqlens, torch.Tensor) or tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"{where}: cache_seqlens must be a (batch,) = ({batch},) tensor, got "
                         f"{_describe(cache_seqlens)}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"{where}: cache_seqlens must be int32, got {cache_seqlens.dtype}")
    _checks.check_device(where, "cache_seqlens", cache_seqlens, "q", q)
    if rope_table is not None:
        _checks.check_rope_table(where, "rope_table", rope_table, head_dim, "q", q)
    if k_new is not None:
        # An expand()ed cache maps several (batch, row, head) slots to one memory row: the fast backends would write
        # them all there and attend to whichever came last.
        _checks.check_writable(where, "k_cache", k_cache)
        _checks.check_writable(where, "v_cache", v_cache)
        _checks.check_distinct(where, "k_cache", k_cache, "v_cache", v_cache)
    if torch.is_grad_enabled() and any(t.requires_grad for _, t in tensors):
        raise RuntimeError(f"{where} is inference-only (no autograd formula): call it under torch.no_grad() or "
                           "torch.inference_mode(), or detach the inputs")
    # Reading device values syncs the GPU with the host: on GPU this runs only under MIRAI_DEBUG=1 and outside CUDA
    # graph capture. Under torch.compile it is skipped (data-dependent branches break the graph); the C++ CPU backend
    # checks the values itself, and the GPU kernels never touch memory outside the cache.
    if batch and not torch.compiler.is_compiling() and (
        cache_seqlens.device.type == "cpu"
        or (_backend.debug_checks() and not torch.cuda.is_current_stream_capturing())
    ):
        lengths = cache_seqlens.long().cpu()
        max_seqlen = k_cache.shape[1]
        if k_new is not None:
            bad = (lengths < 0) | (lengths + seqlen_q > max_seqlen)
            if bad.any():
                b = int(bad.nonzero()[0])
                raise IndexError(f"{where}: cache too small for the append: cache_seqlens[{b}] = {int(lengths[b])} "
                                 f"+ seqlen_q {seqlen_q} > max_seqlen {max_seqlen}")
        else:
            bad = (lengths < seqlen_q) | (lengths > max_seqlen)
            if bad.any():
                b = int(bad.nonzero()[0])
                raise IndexError(f"{where}: without k_new the queries are the last seqlen_q cache rows, so seqlen_q "
                                 f"({seqlen_q}) <= cache_seqlens[{b}] = {int(lengths[b])} <= max_seqlen "
                                 f"({max_seqlen}) is required")
        if rope_table is not None:
            last = int(lengths.max()) + (seqlen_q if k_new is not None else 0) - 1
            if last >= rope_table.shape[0]:
                raise IndexError(f"{where}: position {last} is past the rope_table's {rope_table.shape[0]} rows")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: Optional[torch.Tensor] = None,
    v_new: Optional[torch.Tensor] = None,
    *,
    cache_seqlens: torch.Tensor,
    softmax_scale: Optional[float] = None,
    rope_table: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention of a few new queries over a static KV cache, appending the new keys/values in place.

    Arguments:
        q: ``(batch, seqlen_q, nheads, head_dim)``, float16 / bfloat16 / float32 (float64: reference and C++
            backends). ``seqlen_q`` is small: 1 per decode step, more for a prefill chunk or a speculative window.
        k_cache, v_cache: ``(batch, max_seqlen, nheads_kv, head_dim)`` BSHD, q's dtype, ``nheads % nheads_kv == 0``
            (MQA/GQA: query head ``h`` reads kv head ``h // (nheads // nheads_kv)``). Written in place when
            ``k_new``/``v_new`` are given. Any strides with a unit last-dim stride.
        k_new, v_new: optional ``(batch, seqlen_q, nheads_kv, head_dim)``, q's dtype: written (k_new rotated when
            ``rope_table`` is given) at cache rows ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_q - 1``.
        cache_seqlens: int32 ``(batch,)`` on q's device: each sequence's cache length **before** the append (they
            may differ across the batch). Never modified: the caller advances it. Without ``k_new`` the queries are
            the last ``seqlen_q`` tokens already in the cache.
        softmax_scale: a finite float (NaN/Inf are refused); default ``1 / sqrt(head_dim)``.
        rope_table: optional ``(rows, head_dim/2, 2)`` float32 from :func:`mirai_kernels.rope_2d_table`. q and
            k_new are rotated (LlamaGen interleaved pairs, rounded to q's dtype) by row = their absolute position
            ``L_b - seqlen_q + i`` (``L_b`` the length after the append); v is never rotated.
        num_splits: key splits per (batch, kv head) for the split-KV backends (flash-decoding); 0 picks from the
            static shapes (never from ``cache_seqlens`` values, so a CUDA-graph-captured step keeps its launch).
            Ignored by the reference.
        backend: ``None`` (current default, see :mod:`mirai_kernels.backend`), ``"auto"``, ``"reference"``,
            ``"triton"``, ``"cpp"`` or ``"cuda"``.
    Return:
        out: ``(batch, seqlen_q, nheads, head_dim)`` contiguous, q's dtype. Query ``i`` of sequence ``b`` attends to
        keys ``0 .. L_b - seqlen_q + i`` (bottom-right causal alignment, as FlashAttention's kv-cache API).

    No host synchronisation on GPU (CUDA-graph capturable). ``cache_seqlens`` values (room for the append, rope
    rows) are checked on CPU tensors always and on GPU only with ``MIRAI_DEBUG=1``; invalid values never make the
    GPU kernels touch memory outside the cache, but their results are then undefined. Inference only: raises if
    grad mode is on and an input requires grad.

    Bad input (every backend, checked here once): appending into caches whose rows alias (``expand``ed, stride 0) or
    into ``k_cache`` = ``v_cache`` is refused. Non-finite values follow plain attention (SDPA): a NaN in q or in a
    visible key makes the row NaN, a NaN/Inf in a visible value reaches that output dimension; cache rows a query
    does not see (past ``L_b``, or after its position) never reach it whatever they hold; a row whose visible scores
    are all ``-inf`` is zeros. Empty inputs give empty outputs (the append, if any, still happens).
    """
    _check_inputs(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"decode_attention: num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    scale = _checks.check_softmax_scale("decode_attention", softmax_scale)
    scale = 1.0 / math.sqrt(max(1, q.shape[-1])) if scale is None else scale  # head_dim 0: empty anyway
    # More splits than cache rows only adds empty splits (and a split-sized buffer per split): clamp.
    num_splits = min(num_splits, max(1, k_cache.shape[1]))
    # Empty q (batch, seqlen_q, nheads or head_dim 0): the reference's exact append (k_new may still have rows when
    # nheads = 0) and an empty output, on every backend, with no zero-sized launch.
    face = OP.select(q.device, backend, q.dtype, q)
    if face == "reference":
        return _reference.decode_attention(q, k_cache, v_cache, k_new, v_new, cache_seqlens, scale, rope_table)
    if face == "cuda" and (q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128)):
        raise TypeError(f"decode_attention: backend='cuda' takes float16/bfloat16 with head_dim 64 or 128, got "
                        f"{q.dtype}, head_dim {q.shape[-1]}")
    return OP.op(face)(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table, scale, num_splits)

"""The base-2 online softmax the attention kernels share.

Scores are kept in base 2: the kernels fold ``softmax_scale * LOG2E`` into one multiplier and use ``exp2``/``log2``
(one instruction each on GPUs), and turn back to natural logs (LSEs, gradients of the real scores) with ``LN2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e)
LN2 = 0.6931471805599453  # ln(2) = 1 / LOG2E
# The kernels' copies: a global that a @triton.jit function reads must be a constexpr.
LOG2E_ = tl.constexpr(LOG2E)
LN2_ = tl.constexpr(LN2)


@triton.jit
def softmax_update(m, l, acc, s, v, MAY_BE_EMPTY: tl.constexpr, PREC: tl.constexpr):
    """Fold one key tile into the rows' online softmax: base-2 scores ``s`` (BLOCK_M, BLOCK_N), masked entries
    ``-inf``, and values ``v`` (BLOCK_N, BLOCK_D) into the running max ``m``, sum ``l`` and output accumulator
    ``acc``; returns the new ``(m, l, acc)``. ``MAY_BE_EMPTY``: a row may have no visible key yet (diagonal or
    masked tiles); its exponentials are then taken against 0 instead of ``-inf - -inf = NaN``."""
    m_new = tl.maximum(m, tl.max(s, 1))
    if MAY_BE_EMPTY:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.math.exp2(s - m_ref[:, None])
    corr = tl.math.exp2(m - m_ref)
    l = l * corr + tl.sum(p, 1)
    acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l, acc

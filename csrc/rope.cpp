// C++ CPU backend of the LlamaGen 2D RoPE: the CPU kernel of mirai::apply_rope_2d.
//
// x: (batch, seqlen, nheads, head_dim), any strides with unit last-dim stride (q/k are views of a fused qkv).
// table: (rows, head_dim/2, 2) fp32 contiguous (cos, sin). positions: optional int32 (seqlen,) or (batch, seqlen).
// Returns a contiguous tensor of x's dtype. Math in fp32 (double for double inputs), like the reference.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "rope_checks.h"

namespace mirai {
namespace {

template <typename scalar_t>
void rope_2d_cpu_kernel(const at::Tensor& x, const at::Tensor& table, const c10::optional<at::Tensor>& positions,
                        bool conjugate, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), seqlen = x.size(1), nheads = x.size(2), half_dim = x.size(3) / 2;
  const int64_t sxb = x.stride(0), sxs = x.stride(1), sxh = x.stride(2);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const float* table_data = table.const_data_ptr<float>();
  const int32_t* pos_data = positions.has_value() ? positions->const_data_ptr<int32_t>() : nullptr;
  const bool per_batch_positions = positions.has_value() && positions->dim() == 2;
  const int64_t spb = per_batch_positions ? positions->stride(0) : 0;
  const int64_t sps = positions.has_value() ? positions->stride(-1) : 0;
  const acc_t sign = conjugate ? acc_t(-1) : acc_t(1);

  // One task per token; a token's heads share one table row, which stays in L1 across heads.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, nheads * half_dim));
  at::parallel_for(0, batch * seqlen, grain, [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const int64_t b = token / seqlen, s = token % seqlen;
      const int64_t row = pos_data ? pos_data[b * spb + s * sps] : s;
      const float* rot = table_data + row * half_dim * 2;
      for (int64_t h = 0; h < nheads; ++h) {
        const scalar_t* xi = x_data + b * sxb + s * sxs + h * sxh;
        scalar_t* oi = out_data + ((b * seqlen + s) * nheads + h) * half_dim * 2;
        for (int64_t p = 0; p < half_dim; ++p) {
          const acc_t c = rot[2 * p], sn = sign * acc_t(rot[2 * p + 1]);
          const acc_t x0 = acc_t(xi[2 * p]), x1 = acc_t(xi[2 * p + 1]);
          oi[2 * p] = scalar_t(x0 * c - x1 * sn);
          oi[2 * p + 1] = scalar_t(x1 * c + x0 * sn);
        }
      }
    }
  });
}

at::Tensor apply_rope_2d_cpu(const at::Tensor& x, const at::Tensor& table, const c10::optional<at::Tensor>& positions,
                             bool conjugate) {
  check_rope_inputs(x, table, positions, /*expected_device=*/at::kCPU);
  if (positions.has_value() && positions->numel() > 0) {
    // On CPU the range check costs no synchronisation, so it always runs (an out-of-range row would read past
    // the table).
    const auto lo = positions->min().item<int32_t>(), hi = positions->max().item<int32_t>();
    TORCH_CHECK(lo >= 0 && hi < table.size(0), "apply_rope_2d: positions must lie in [0, ", table.size(0),
                "), got values in [", lo, ", ", hi, "]");
  }
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_rope_2d_cpp", [&] {
    rope_2d_cpu_kernel<scalar_t>(x, table, positions, conjugate, out);
  });
  return out;
}

}  // namespace

// The schema of mirai::apply_rope_2d is declared once, in mirai_kernels/ops/rope.py; this is its CPU kernel.
TORCH_LIBRARY_IMPL(mirai, CPU, m) { m.impl("apply_rope_2d", &apply_rope_2d_cpu); }

}  // namespace mirai

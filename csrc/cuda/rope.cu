// CUDA C++ face of the LlamaGen 2D RoPE (mirai::apply_rope_2d_cuda). Same contract as csrc/rope.cpp.
//
// One thread rotates one pair; a block covers a few tokens x all heads x all pairs, so each table row is read once
// per token from L1/L2. Positions are not range-checked here (that would need a device->host sync); the Python
// door checks them under MIRAI_DEBUG=1.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../rope_checks.h"

namespace mirai {
namespace {

template <typename scalar_t>
__global__ void rope_2d_cuda_kernel(const scalar_t* __restrict__ x, const float2* __restrict__ table,
                                    const int32_t* __restrict__ positions, scalar_t* __restrict__ out,
                                    int64_t n_pairs_total, int64_t seqlen, int64_t nheads, int64_t half_dim,
                                    int64_t sxb, int64_t sxs, int64_t sxh, int64_t spb, int64_t sps, bool conjugate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_pairs_total) return;
  const int64_t p = idx % half_dim;
  const int64_t h = (idx / half_dim) % nheads;
  const int64_t token = idx / (half_dim * nheads);
  const int64_t b = token / seqlen, s = token % seqlen;
  const int64_t row = positions ? positions[b * spb + s * sps] : s;
  const float2 cs = table[row * half_dim + p];
  const acc_t c = cs.x, sn = conjugate ? -cs.y : cs.y;
  const scalar_t* xi = x + b * sxb + s * sxs + h * sxh + 2 * p;
  const acc_t x0 = acc_t(xi[0]), x1 = acc_t(xi[1]);
  out[2 * idx] = scalar_t(x0 * c - x1 * sn);
  out[2 * idx + 1] = scalar_t(x1 * c + x0 * sn);
}

at::Tensor apply_rope_2d_cuda(const at::Tensor& x, const at::Tensor& table, const c10::optional<at::Tensor>& positions,
                              bool conjugate) {
  check_rope_inputs(x, table, positions, /*expected_device=*/at::kCUDA);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n_pairs_total = out.numel() / 2;
  if (n_pairs_total == 0) return out;
  const bool per_batch = positions.has_value() && positions->dim() == 2;
  const int64_t spb = per_batch ? positions->stride(0) : 0;
  const int64_t sps = positions.has_value() ? positions->stride(-1) : 0;
  const int32_t* pos = positions.has_value() ? positions->const_data_ptr<int32_t>() : nullptr;
  constexpr int threads = 256;
  const int64_t blocks = (n_pairs_total + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_rope_2d_cuda", [&] {
    rope_2d_cuda_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), reinterpret_cast<const float2*>(table.const_data_ptr<float>()), pos,
        out.mutable_data_ptr<scalar_t>(), n_pairs_total, x.size(1), x.size(2), x.size(3) / 2, x.stride(0),
        x.stride(1), x.stride(2), spb, sps, conjugate);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// The schema of mirai::apply_rope_2d is declared once, in mirai_kernels/ops/rope.py; this is its CUDA kernel.
TORCH_LIBRARY_IMPL(mirai, CUDA, m) { m.impl("apply_rope_2d", &apply_rope_2d_cuda); }

}  // namespace mirai

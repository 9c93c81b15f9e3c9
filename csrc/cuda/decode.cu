// CUDA C++ face of KV-cache decode attention (mirai::decode_attention_cuda): fused append + RoPE + split-KV
// attention, then a combine. Same contract as csrc/decode.cpp (semantics: mirai_kernels/reference/decode.py);
// float16/bfloat16, head_dim 64 or 128.
//
// Decoding reads the whole KV cache to do ~2 FLOPs per byte, so the kernel is built around memory traffic:
// * one block per (split, batch * kv head, query-row tile); the rows of a tile are every query of the kv head's
//   group (GQA) times every new token, so each K/V row is read once per group;
// * each key row is read by head_dim/8 threads with one 16-byte load each; score partial sums are reduced with
//   warp shuffles, so no tensor cores and no shared-memory K/V staging (there is nothing to reuse);
// * the append is fused: the split whose key range covers a new row reads it from k_new/v_new (rotating k), uses
//   it, and writes it to the cache. Key ranges of the splits partition [0, L_b), so no block ever reads a row
//   another block writes; only the query-row tiles of one split write the same row, with identical values;
// * the split ranges are computed on the device from cache_seqlens (short sequences spread their keys over all
//   splits); the grid depends on shapes only, never on cache_seqlens values: the launch is CUDA-graph capturable
//   and there is no host synchronisation;
// * invalid cache_seqlens (checked by the Python door on CPU / with MIRAI_DEBUG=1, never here: that would sync)
//   are clamped so no access leaves the cache or the rope table.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "decode.cuh"

namespace mirai {
namespace {

using namespace decode_cuda;

int multiprocessor_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename T, int D, int MQ>
void launch_split(const DecodeParams& p, dim3 grid, cudaStream_t stream) {
  decode_split_kernel<T, D, MQ><<<grid, kThreads, 0, stream>>>(p);
}

template <typename T, int D>
void launch(const DecodeParams& p, int mq, int64_t tiles, int64_t batch_heads_kv, int64_t out_rows,
            cudaStream_t stream) {
  const dim3 grid(p.num_splits, batch_heads_kv, tiles);
  switch (mq) {
    case 1: launch_split<T, D, 1>(p, grid, stream); break;
    case 2: launch_split<T, D, 2>(p, grid, stream); break;
    case 4: launch_split<T, D, 4>(p, grid, stream); break;
    default: launch_split<T, D, 8>(p, grid, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    decode_combine_kernel<T, D><<<out_rows, D, 0, stream>>>(p.part_o, p.part_lse, static_cast<T*>(p.out),
                                                            p.num_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor decode_attention_cuda(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                 const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                                 const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& rope_table,
                                 double softmax_scale, int64_t num_splits) {
  check_decode_inputs(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table, at::kCUDA);
  c10::cuda::CUDAGuard guard(q.device());
  DecodePlan plan = plan_decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table, softmax_scale,
                                num_splits, multiprocessor_count(q.device().index()));
  if (plan.out.numel() == 0) return plan.out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int mq = plan.rows_per_block;
  if (q.scalar_type() == at::kHalf) {
    if (q.size(3) == 64)
      launch<c10::Half, 64>(plan.p, mq, plan.tiles, plan.batch_heads_kv, plan.out_rows, stream);
    else
      launch<c10::Half, 128>(plan.p, mq, plan.tiles, plan.batch_heads_kv, plan.out_rows, stream);
  } else {
    if (q.size(3) == 64)
      launch<c10::BFloat16, 64>(plan.p, mq, plan.tiles, plan.batch_heads_kv, plan.out_rows, stream);
    else
      launch<c10::BFloat16, 128>(plan.p, mq, plan.tiles, plan.batch_heads_kv, plan.out_rows, stream);
  }
  return plan.out;
}

}  // namespace

// The schema of mirai::decode_attention is declared once, in mirai_kernels/ops/decode.py; this is its CUDA kernel.
TORCH_LIBRARY_IMPL(mirai, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace mirai

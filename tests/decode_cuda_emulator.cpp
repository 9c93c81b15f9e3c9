// Runs the CUDA kernels of decode attention (csrc/cuda/decode.cuh) on the CPU, so their logic is tested on machines
// without a GPU (tests/test_decode.py builds this with torch.utils.cpp_extension.load).
//
// Emulation: blocks run one after another; the threads of a block are OS threads; __syncthreads is a barrier of the
// block, __shfl_xor_sync a barrier-fenced exchange within each warp's 32 threads (a kernel whose lanes disagree on
// how many shuffles they do deadlocks here, as it would misbehave on a GPU), __shared__ arrays are function
// statics (one block at a time). Host planning (split count, alignment checks, parameters) is the real
// plan_decode of the CUDA face, with a pretend 4-SM device.
#include <pthread.h>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct EmuBlock;
thread_local EmuDim threadIdx, blockIdx;
thread_local EmuBlock* emu_block = nullptr;

struct EmuBlock {
  pthread_barrier_t block;
  pthread_barrier_t warp[32];
  float exchange[32][32];
};

inline void __syncthreads() { pthread_barrier_wait(&emu_block->block); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  emu_block->exchange[w][lane] = v;
  pthread_barrier_wait(&emu_block->warp[w]);
  const float r = emu_block->exchange[w][lane ^ lane_mask];
  pthread_barrier_wait(&emu_block->warp[w]);
  return r;
}

#include <algorithm>
using std::max;
using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#include "decode.cuh"

#include <torch/library.h>

namespace mirai {
namespace {
using namespace decode_cuda;

// Runs every block of a grid, one block at a time, each with `threads` OS threads.
template <typename F>
void run_grid(unsigned gx, unsigned gy, unsigned gz, int threads, F kernel) {
  EmuBlock blk;
  pthread_barrier_init(&blk.block, nullptr, threads);
  const int warps = (threads + 31) / 32;
  for (int w = 0; w < warps; ++w) pthread_barrier_init(&blk.warp[w], nullptr, std::min(32, threads - 32 * w));
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = EmuDim{static_cast<unsigned>(t), 0, 0};
            blockIdx = EmuDim{x, y, z};
            emu_block = &blk;
            kernel();
          });
        for (auto& th : pool) th.join();
      }
  pthread_barrier_destroy(&blk.block);
  for (int w = 0; w < warps; ++w) pthread_barrier_destroy(&blk.warp[w]);
}

template <typename T, int D>
void emulate(const DecodePlan& plan) {
  const DecodeParams& p = plan.p;
  auto split = [&] {
    switch (plan.rows_per_block) {
      case 1: decode_split_kernel<T, D, 1>(p); break;
      case 2: decode_split_kernel<T, D, 2>(p); break;
      case 4: decode_split_kernel<T, D, 4>(p); break;
      default: decode_split_kernel<T, D, 8>(p); break;
    }
  };
  run_grid(p.num_splits, plan.batch_heads_kv, plan.tiles, kThreads, split);
  if (p.num_splits > 1) {
    for (int64_t row = 0; row < plan.out_rows; ++row) {
      // The combine kernel has no barriers or shuffles: run its threads one after another.
      for (int d = 0; d < D; ++d) {
        threadIdx = EmuDim{static_cast<unsigned>(d), 0, 0};
        blockIdx = EmuDim{static_cast<unsigned>(row), 0, 0};
        decode_combine_kernel<T, D>(p.part_o, p.part_lse, static_cast<T*>(p.out), p.num_splits);
      }
    }
  }
}

at::Tensor decode_attention_emulated(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                     const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                                     const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& rope_table,
                                     double softmax_scale, int64_t num_splits) {
  check_decode_inputs(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table, at::kCPU);
  DecodePlan plan = plan_decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table, softmax_scale,
                                num_splits, /*sms=*/4);
  if (plan.out.numel() == 0) return plan.out;
  if (q.scalar_type() == at::kHalf) {
    if (q.size(3) == 64) emulate<c10::Half, 64>(plan); else emulate<c10::Half, 128>(plan);
  } else {
    if (q.size(3) == 64) emulate<c10::BFloat16, 64>(plan); else emulate<c10::BFloat16, 128>(plan);
  }
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mirai_emu, m) {
  m.def("decode_attention_cuda_emulated(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new, "
        "Tensor? v_new, Tensor cache_seqlens, Tensor? rope_table, float softmax_scale, int num_splits) -> Tensor");
}
TORCH_LIBRARY_IMPL(mirai_emu, CPU, m) { m.impl("decode_attention_cuda_emulated", &decode_attention_emulated); }
}  // namespace mirai

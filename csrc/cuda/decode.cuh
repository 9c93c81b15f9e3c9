// Kernels and launch planning of the CUDA face of decode attention (included by decode.cu). Host planning is
// plain C++ so that the kernels' logic can also be compiled for the CPU by a thread-emulation harness
// (tests/decode_cuda_emulator.cpp), which runs them block by block against the reference on machines without a GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "../decode_checks.h"

namespace mirai {
namespace decode_cuda {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kKeyChunk = 64;  // keys scored per shared-memory round; two per lane in the softmax step
constexpr int kMaxSplits = 64;
constexpr unsigned kFullMask = 0xffffffffu;

struct DecodeParams {
  const void* q;
  void* k_cache;
  void* v_cache;
  const void* k_new;
  const void* v_new;
  const int32_t* seqlens;
  const float* table;  // nullptr: no rope
  float* part_o;       // (B, S_q, H, splits, D), unused with one split
  float* part_lse;     // (B, S_q, H, splits), base 2
  void* out;           // (B, S_q, H, D) contiguous
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t kn_sb, kn_ss, kn_sh;
  int64_t vn_sb, vn_ss, vn_sh;
  int seqlen_q, nheads, nheads_kv, group, rows, max_seqlen, table_rows, num_splits;
  float scale_log2;
  bool append;
};

template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* ptr) {
  return *reinterpret_cast<const uint4*>(ptr);
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[8]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int u = 0; u < 8; ++u) out[u] = static_cast<float>(e[u]);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&in)[8]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int u = 0; u < 8; ++u) e[u] = static_cast<T>(in[u]);
  return raw;
}

// LlamaGen rounds rotated q and k to the activation dtype; the reference does too.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

template <typename T, int D, int MQ>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
  constexpr int TPK = D / 8;           // threads per key row, 8 elements (16 bytes) each
  constexpr int KPP = kThreads / TPK;  // key rows per pass of the block
  static_assert(TPK <= 32 && 32 % TPK == 0, "a key row must sit within one warp");
  constexpr int NP = kKeyChunk / KPP;  // key rows per thread per chunk
  static_assert(kKeyChunk % KPP == 0 && kKeyChunk == 64, "softmax step assumes two keys per lane");

  __shared__ float s_s[MQ][kKeyChunk];  // scores, then probabilities, of the current key chunk
  __shared__ float alpha_s[MQ], m_s[MQ], l_s[MQ];
  __shared__ float red_s[kWarps][MQ][D];

  const int split = blockIdx.x;
  const int b = blockIdx.y / p.nheads_kv, hk = blockIdx.y % p.nheads_kv;
  const int row0 = blockIdx.z * MQ;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int dc = tid % TPK;  // this thread's 8-element chunk of the head dim
  const int kl = tid / TPK;  // this thread's key lane

  const int cache_len = p.seqlens[b];
  const int length = min(cache_len + (p.append ? p.seqlen_q : 0), p.max_seqlen);
  const int per_split = length > 0 ? (length + p.num_splits - 1) / p.num_splits : 0;
  const int key_begin = min(max(length, 0), split * per_split);
  const int key_end = min(max(length, 0), key_begin + per_split);
  const int new_begin = p.append ? max(cache_len, 0) : INT_MAX;  // rows >= new_begin come from k_new/v_new

  const T* q = static_cast<const T*>(p.q);
  T* k_cache = static_cast<T*>(p.k_cache);
  T* v_cache = static_cast<T*>(p.v_cache);
  const T* k_new = static_cast<const T*>(p.k_new);
  const T* v_new = static_cast<const T*>(p.v_new);
  const int64_t k_base = b * p.k_sb + hk * p.k_sh, v_base = b * p.v_sb + hk * p.v_sh;
  const int64_t kn_base = b * p.kn_sb + hk * p.kn_sh, vn_base = b * p.vn_sb + hk * p.vn_sh;

  // This thread's slice of every query row (rotated, rounded), and each row's last visible key.
  float qr[MQ][8];
  int limit[MQ];
#pragma unroll
  for (int r = 0; r < MQ; ++r) {
    const int rg = row0 + r;
    limit[r] = -1;
#pragma unroll
    for (int u = 0; u < 8; ++u) qr[r][u] = 0.f;
    if (rg < p.rows) {
      const int i = rg / p.group, head = hk * p.group + rg % p.group;
      limit[r] = length - p.seqlen_q + i;
      const T* src = q + b * p.q_sb + i * p.q_ss + head * p.q_sh + dc * 8;
#pragma unroll
      for (int u = 0; u < 8; ++u) qr[r][u] = static_cast<float>(src[u]);  // q may be any view: scalar loads
      if (p.table != nullptr) {
        const int pos = min(max(limit[r], 0), p.table_rows - 1);
        const float* rot = p.table + static_cast<int64_t>(pos) * D + dc * 8;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float c = rot[2 * u], s = rot[2 * u + 1], x0 = qr[r][2 * u], x1 = qr[r][2 * u + 1];
          qr[r][2 * u] = round_to<T>(x0 * c - x1 * s);
          qr[r][2 * u + 1] = round_to<T>(x1 * c + x0 * s);
        }
      }
    }
  }
  if (tid < MQ) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  float acc[MQ][8];
#pragma unroll
  for (int r = 0; r < MQ; ++r)
#pragma unroll
    for (int u = 0; u < 8; ++u) acc[r][u] = 0.f;
  __syncthreads();

  for (int c0 = key_begin; c0 < key_end; c0 += kKeyChunk) {
    const int nk = min(kKeyChunk, key_end - c0);

    // 1. Issue every K and V load of the chunk first (2 * NP 16-byte loads in flight per thread: the loop is
    //    latency-bound otherwise). New rows come from k_new/v_new: k rotated, both written to the cache here, and
    //    used from registers (this block is the only reader of those rows).
    uint4 kraw[NP], vraw[NP];
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      const int jj = n * KPP + kl, key = c0 + jj;
      kraw[n] = uint4{0u, 0u, 0u, 0u};
      vraw[n] = uint4{0u, 0u, 0u, 0u};
      if (jj < nk) {
        if (key < new_begin) {
          kraw[n] = load_raw(k_cache + k_base + static_cast<int64_t>(key) * p.k_ss + dc * 8);
          vraw[n] = load_raw(v_cache + v_base + static_cast<int64_t>(key) * p.v_ss + dc * 8);
        } else {
          const int i = key - new_begin;
          kraw[n] = load_raw(k_new + kn_base + i * p.kn_ss + dc * 8);
          vraw[n] = load_raw(v_new + vn_base + i * p.vn_ss + dc * 8);
          if (p.table != nullptr) {
            float kv[8];
            unpack8<T>(kraw[n], kv);
            const int pos = min(key, p.table_rows - 1);
            const float* rot = p.table + static_cast<int64_t>(pos) * D + dc * 8;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const float c = rot[2 * u], s = rot[2 * u + 1], x0 = kv[2 * u], x1 = kv[2 * u + 1];
              kv[2 * u] = x0 * c - x1 * s;
              kv[2 * u + 1] = x1 * c + x0 * s;
            }
            kraw[n] = pack8<T>(kv);  // rounded to T, as the reference
          }
          *reinterpret_cast<uint4*>(k_cache + k_base + static_cast<int64_t>(key) * p.k_ss + dc * 8) = kraw[n];
          *reinterpret_cast<uint4*>(v_cache + v_base + static_cast<int64_t>(key) * p.v_ss + dc * 8) = vraw[n];
        }
      }
    }

    // Scores: each key row's TPK threads reduce their partial dots with shuffles.
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      const int jj = n * KPP + kl, key = c0 + jj;
      float kv[8];
      unpack8<T>(kraw[n], kv);
#pragma unroll
      for (int r = 0; r < MQ; ++r) {
        float part = 0.f;
#pragma unroll
        for (int u = 0; u < 8; ++u) part += qr[r][u] * kv[u];
#pragma unroll
        for (int off = TPK / 2; off > 0; off >>= 1) part += __shfl_xor_sync(kFullMask, part, off);
        if (dc == 0) s_s[r][jj] = (jj < nk && key <= limit[r]) ? part * p.scale_log2 : -INFINITY;
      }
    }
    __syncthreads();

    // 2. Online softmax, one warp per row.
    for (int r = warp; r < MQ; r += kWarps) {
      const float s0 = s_s[r][lane], s1 = s_s[r][lane + 32];
      float mx = fmaxf(s0, s1);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      // A row with no visible key yet (or only -inf scores) keeps m = -inf and l = 0: shifting by 0 then gives
      // weights exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN, while a NaN score (skipped by fmaxf) still
      // gives a NaN weight, so l and the row become NaN as in plain attention.
      const float shift = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_old - shift);
      const float p0 = exp2f(s0 - shift);
      const float p1 = exp2f(s1 - shift);
      float sum = p0 + p1;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFullMask, sum, off);
      s_s[r][lane] = p0;
      s_s[r][lane + 32] = p1;
      if (lane == 0) {
        alpha_s[r] = alpha;
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + sum;
      }
    }
    __syncthreads();

    // 3. acc = alpha * acc + P V, from the V rows already in registers.
#pragma unroll
    for (int r = 0; r < MQ; ++r) {
      const float a = alpha_s[r];
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[r][u] *= a;
    }
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      const int jj = n * KPP + kl, key = c0 + jj;
      if (jj >= nk) continue;
      float vv[8];
      unpack8<T>(vraw[n], vv);
#pragma unroll
      for (int r = 0; r < MQ; ++r) {
        // A key after the row's position is skipped, not weighted by 0: 0 * NaN would let a NaN value of a
        // masked-out row reach the output.
        if (key > limit[r]) continue;
        const float pr = s_s[r][jj];
#pragma unroll
        for (int u = 0; u < 8; ++u) acc[r][u] += pr * vv[u];
      }
    }
    __syncthreads();  // s_s is overwritten by the next chunk
  }

  // Sum the key lanes: first within the warp (lanes with the same dc), then across warps in shared memory.
#pragma unroll
  for (int r = 0; r < MQ; ++r)
#pragma unroll
    for (int u = 0; u < 8; ++u)
#pragma unroll
      for (int off = TPK; off < 32; off <<= 1) acc[r][u] += __shfl_xor_sync(kFullMask, acc[r][u], off);
  if (lane < TPK) {
#pragma unroll
    for (int r = 0; r < MQ; ++r)
#pragma unroll
      for (int u = 0; u < 8; ++u) red_s[warp][r][dc * 8 + u] = acc[r][u];
  }
  __syncthreads();

  for (int idx = tid; idx < MQ * D; idx += kThreads) {
    const int r = idx / D, d = idx % D, rg = row0 + r;
    if (rg >= p.rows) continue;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += red_s[w][r][d];
    const float l = l_s[r];
    const bool any = l != 0.f;  // l NaN (NaN in q or a visible key) propagates; l = 0: nothing attended
    o = any ? o / l : 0.f;
    const int i = rg / p.group, head = hk * p.group + rg % p.group;
    const int64_t orow = (static_cast<int64_t>(b) * p.seqlen_q + i) * p.nheads + head;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[orow * D + d] = static_cast<T>(o);
    } else {
      p.part_o[(orow * p.num_splits + split) * D + d] = o;
      if (d == 0) p.part_lse[orow * p.num_splits + split] = any ? m_s[r] + log2f(l) : -INFINITY;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(D) decode_combine_kernel(const float* __restrict__ part_o,
                                                            const float* __restrict__ part_lse, T* __restrict__ out,
                                                            int num_splits) {
  const int64_t row = blockIdx.x;  // (b * S_q + i) * H + h
  const float* lse = part_lse + row * num_splits;
  float mx = -INFINITY;
  bool nan_split = false;  // fmaxf skips NaN, so a NaN split is looked for explicitly
  for (int s = 0; s < num_splits; ++s) {
    nan_split = nan_split || lse[s] != lse[s];  // isnan, spelled so the CPU emulator needs no CUDA math header
    mx = fmaxf(mx, lse[s]);
  }
  const int d = threadIdx.x;
  float o = nan_split ? NAN : 0.f, wsum = nan_split ? 1.f : 0.f;
  if (!nan_split && mx != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(lse[s] - mx);  // 0 for empty splits
      wsum += w;
      o += w * part_o[(row * num_splits + s) * D + d];
    }
  }
  out[row * D + d] = static_cast<T>(wsum > 0.f ? o / wsum : 0.f);
}

// Splits per (batch, kv head, row tile) for num_splits = 0, from static shapes only: about eight resident blocks
// per SM (latency hiding for a bandwidth-bound loop), each split keeping >= 128 keys of a full cache.
inline int64_t num_splits_heuristic(int64_t blocks_without_split, int64_t max_seqlen, int64_t sms) {
  const int64_t target = 8 * sms;
  const int64_t by_occupancy = (target + blocks_without_split - 1) / std::max<int64_t>(blocks_without_split, 1);
  const int64_t by_length = std::max<int64_t>(1, max_seqlen / 128);
  return std::max<int64_t>(1, std::min<int64_t>({by_occupancy, by_length, kMaxSplits}));
}

inline bool vector_aligned(const at::Tensor& t) {
  // Rows are read and written with 16-byte vectors.
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0;
}

// Everything a launch needs: the kernel parameters, the block shape choice, and the tensors they point into.
struct DecodePlan {
  DecodeParams p{};
  int rows_per_block = 1;  // MQ: 1, 2, 4 or 8
  int64_t tiles = 1, batch_heads_kv = 0, out_rows = 0;
  at::Tensor out, part_o, part_lse, k_new, v_new, seqlens;
};

// Checks the face's own limits (dtype, head dim, alignment), allocates the output and the split partials, fills
// the parameters. `sms`: multiprocessor count of the device, for num_splits = 0.
inline DecodePlan plan_decode(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                              const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                              const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& rope_table,
                              double softmax_scale, int64_t num_splits, int64_t sms) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "decode_attention (cuda face): float16 or bfloat16 only, got ", q.scalar_type());
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "decode_attention (cuda face): head_dim 64 or 128, got ", head_dim);
  TORCH_CHECK(num_splits >= 0, "decode_attention: num_splits must be >= 0 (0 = heuristic), got ", num_splits);
  TORCH_CHECK(k_cache.size(1) < INT32_MAX, "decode_attention (cuda face): max_seqlen must fit in int32");
  auto check_aligned = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(vector_aligned(t), "decode_attention (cuda face): ", name, " must be 16-byte aligned with ",
                "batch/seq/head strides that are multiples of 8 elements, got strides ", t.strides());
  };
  check_aligned(k_cache, "k_cache");
  check_aligned(v_cache, "v_cache");
  DecodePlan plan;
  const bool append = k_new.has_value();
  if (append) {
    // Tiny (S_q rows): copy rather than reject a misaligned view.
    plan.k_new = vector_aligned(*k_new) ? *k_new : k_new->contiguous();
    plan.v_new = vector_aligned(*v_new) ? *v_new : v_new->contiguous();
  }
  plan.seqlens = cache_seqlens.contiguous();
  plan.out = at::empty({batch, seqlen_q, nheads, head_dim}, q.options());

  const int64_t nheads_kv = k_cache.size(2), group = nheads / nheads_kv, rows = seqlen_q * group;
  plan.rows_per_block = rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
  plan.tiles = (rows + plan.rows_per_block - 1) / plan.rows_per_block;
  plan.batch_heads_kv = batch * nheads_kv;
  plan.out_rows = batch * seqlen_q * nheads;
  TORCH_CHECK(plan.batch_heads_kv <= 65535 && plan.tiles <= 65535, "decode_attention (cuda face): grid too large");
  int64_t splits = num_splits > 0 ? num_splits
                                  : num_splits_heuristic(plan.batch_heads_kv * plan.tiles, k_cache.size(1), sms);
  splits = std::min<int64_t>(splits, kMaxSplits);
  if (splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    plan.part_o = at::empty({batch, seqlen_q, nheads, splits, head_dim}, f32);
    plan.part_lse = at::empty({batch, seqlen_q, nheads, splits}, f32);
  }

  DecodeParams& p = plan.p;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_new = append ? plan.k_new.data_ptr() : nullptr;
  p.v_new = append ? plan.v_new.data_ptr() : nullptr;
  p.seqlens = plan.seqlens.const_data_ptr<int32_t>();
  p.table = rope_table.has_value() ? rope_table->const_data_ptr<float>() : nullptr;
  p.part_o = splits > 1 ? plan.part_o.mutable_data_ptr<float>() : nullptr;
  p.part_lse = splits > 1 ? plan.part_lse.mutable_data_ptr<float>() : nullptr;
  p.out = plan.out.data_ptr();
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k_cache.stride(0), p.k_ss = k_cache.stride(1), p.k_sh = k_cache.stride(2);
  p.v_sb = v_cache.stride(0), p.v_ss = v_cache.stride(1), p.v_sh = v_cache.stride(2);
  if (append) {
    p.kn_sb = plan.k_new.stride(0), p.kn_ss = plan.k_new.stride(1), p.kn_sh = plan.k_new.stride(2);
    p.vn_sb = plan.v_new.stride(0), p.vn_ss = plan.v_new.stride(1), p.vn_sh = plan.v_new.stride(2);
  }
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.nheads = static_cast<int>(nheads);
  p.nheads_kv = static_cast<int>(nheads_kv);
  p.group = static_cast<int>(group);
  p.rows = static_cast<int>(rows);
  p.max_seqlen = static_cast<int>(k_cache.size(1));
  p.table_rows = rope_table.has_value() ? static_cast<int>(rope_table->size(0)) : 1;
  p.num_splits = static_cast<int>(splits);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.append = append;
  return plan;
}

}  // namespace decode_cuda
}  // namespace mirai

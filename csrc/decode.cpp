// C++ CPU backend of KV-cache decode attention (the CPU kernel of mirai::decode_attention): the CPU sampling path.
//
// q (B, S_q, H, D); k_cache/v_cache (B, S_max, H_kv, D), written in place at rows cache_seqlens[b] + i when
// k_new/v_new (B, S_q, H_kv, D) are given; cache_seqlens int32 (B,) = lengths before the append (never modified);
// rope_table optional fp32 (rows, D/2, 2). All tensors any strides with a unit last-dim stride. Returns a contiguous
// (B, S_q, H, D) tensor of q's dtype. Semantics: mirai_kernels/reference/decode.py.
//
// Same structure as the GPU faces (split-KV + combine), which on CPU buys parallelism when batch * kv heads is
// smaller than the thread count: one task per (batch, kv head, split) computes the partial softmax of every query
// of its head group over its slice of keys, so each key row is read (and converted to fp32) once per group.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "decode_checks.h"

namespace mirai {
namespace {

constexpr int64_t kKeyBlock = 32;

// Keys per split below which splitting costs more (partials, combine) than it gains.
constexpr int64_t kMinKeysPerSplit = 128;

int64_t cpu_num_splits(int64_t requested, int64_t batch, int64_t nheads_kv, int64_t max_keys) {
  if (requested > 0) return std::min(requested, std::max<int64_t>(1, max_keys));  // more splits would all be empty
  // Depends on static shapes only (not on cache_seqlens), like the GPU heuristic, so a captured step stays valid.
  const int64_t threads = at::get_num_threads();
  const int64_t tasks = batch * nheads_kv;
  if (tasks >= threads) return 1;
  const int64_t by_threads = (threads + tasks - 1) / tasks;
  const int64_t by_length = std::max<int64_t>(1, max_keys / kMinKeysPerSplit);
  return std::max<int64_t>(1, std::min<int64_t>({by_threads, by_length, 64}));
}

template <typename acc_t>
inline acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  // Eight independent partial sums let the compiler vectorise without -ffast-math.
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int u = 0; u < 8; ++u) part[u] += a[d + u] * b[d + u];
  acc_t s = 0;
  for (; d < n; ++d) s += a[d] * b[d];
  for (int u = 0; u < 8; ++u) s += part[u];
  return s;
}

// Widen a row to the accumulation type. bfloat16 -> float is a 16-bit shift, written on the raw bits so the
// compiler vectorises it (c10's scalar conversion does not).
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void to_acc(const scalar_t* __restrict__ src, acc_t* __restrict__ dst,
                                                  int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst);
    for (int64_t d = 0; d < n; ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = acc_t(src[d]);
  }
}

// Rotate one row of `half_dim` interleaved pairs by table row `rot`, rounding to scalar_t as the reference
// (LlamaGen rounds rotated q and k to the activation dtype).
template <typename scalar_t, typename acc_t>
inline void rotate_row(const scalar_t* x, const float* rot, int64_t half_dim, scalar_t* out) {
  for (int64_t p = 0; p < half_dim; ++p) {
    const acc_t c = rot[2 * p], sn = rot[2 * p + 1];
    const acc_t x0 = acc_t(x[2 * p]), x1 = acc_t(x[2 * p + 1]);
    out[2 * p] = scalar_t(x0 * c - x1 * sn);
    out[2 * p + 1] = scalar_t(x1 * c + x0 * sn);
  }
}


// Everything one attention task reads; the task loop is compiled twice (baseline x86-64 and AVX2+FMA, picked at
// run time) since the package is built without -march flags.
template <typename scalar_t>
struct AttendCtx {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* qd;
  int64_t sqb, sqs, sqh;
  const scalar_t* kc;
  const scalar_t* vc;
  int64_t skb, sks, skh, svb, svs, svh;
  const int64_t* seqlens;
  const float* table;
  bool appending;
  int64_t seqlen_q, group, nheads_kv, num_splits, head_dim, rows;
  acc_t* part_o;
  acc_t* part_lse;
  acc_t scale;
};

// Partial softmax attention of tasks [begin, end), task = (batch * nheads_kv + kv head) * num_splits + split.
// Query rows of a task: r = i * group + g (query head hk * group + g).
template <typename scalar_t>
inline __attribute__((always_inline)) void attend_tasks(const AttendCtx<scalar_t>& c, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t seqlen_q = c.seqlen_q, group = c.group, nheads_kv = c.nheads_kv, num_splits = c.num_splits;
  const int64_t head_dim = c.head_dim, half_dim = head_dim / 2, rows = c.rows;
  const scalar_t *qd = c.qd, *kc = c.kc, *vc = c.vc;
  const int64_t sqb = c.sqb, sqs = c.sqs, sqh = c.sqh;
  const int64_t skb = c.skb, sks = c.sks, skh = c.skh, svb = c.svb, svs = c.svs, svh = c.svh;
  const int64_t* seqlens = c.seqlens;
  const float* table = c.table;
  const bool appending = c.appending;
  const acc_t scale = c.scale;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t* part_o = c.part_o;
  acc_t* part_lse = c.part_lse;
  auto position = [&](int64_t b, int64_t i) { return seqlens[b] + (appending ? 0 : -seqlen_q) + i; };
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(scalar_t));
  std::vector<acc_t> qf(rows * head_dim), kf(kKeyBlock * head_dim), vf(kKeyBlock * head_dim);
  std::vector<acc_t> m(rows), l(rows), acc(rows * head_dim), p(kKeyBlock);
  std::vector<scalar_t> tmp(head_dim);
  std::vector<int64_t> limit(rows);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t split = task % num_splits, bh = task / num_splits;
    const int64_t b = bh / nheads_kv, hk = bh % nheads_kv;
    const int64_t length = seqlens[b] + (appending ? seqlen_q : 0);
    const int64_t chunk = (length + num_splits - 1) / num_splits;
    const int64_t key_begin = std::min(length, split * chunk), key_end = std::min(length, key_begin + chunk);

    for (int64_t i = 0; i < seqlen_q; ++i) {
      const int64_t pos = position(b, i);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = i * group + g;
        const scalar_t* src = qd + b * sqb + i * sqs + (hk * group + g) * sqh;
        if (table) {
          rotate_row<scalar_t, acc_t>(src, table + pos * head_dim, half_dim, tmp.data());
          src = tmp.data();
        }
        for (int64_t d = 0; d < head_dim; ++d) qf[r * head_dim + d] = acc_t(src[d]);
        limit[r] = pos;
      }
    }
    std::fill(m.begin(), m.end(), neg_inf);
    std::fill(l.begin(), l.end(), acc_t(0));
    std::fill(acc.begin(), acc.end(), acc_t(0));

    for (int64_t k0 = key_begin; k0 < key_end; k0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, key_end - k0);
      // Rows of this block as acc_t: the cache itself when it already is (fp32/fp64), else converted once and
      // shared by every query row of the group.
      const acc_t* krows[kKeyBlock];
      const acc_t* vrows[kKeyBlock];
      for (int64_t j = 0; j < nk; ++j) {
        const scalar_t* ks = kc + b * skb + (k0 + j) * sks + hk * skh;
        const scalar_t* vs = vc + b * svb + (k0 + j) * svs + hk * svh;
        if (k0 + kKeyBlock + j < key_end) {
          // Rows of one head are H_kv * D apart (BSHD), often a page apart: the hardware prefetcher does not follow
          // them, so fetch the next block's rows while this one is computed.
          const char* kn = reinterpret_cast<const char*>(ks + kKeyBlock * sks);
          const char* vn = reinterpret_cast<const char*>(vs + kKeyBlock * svs);
          for (int64_t off = 0; off < row_bytes; off += 64) {
            __builtin_prefetch(kn + off);
            __builtin_prefetch(vn + off);
          }
        }
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          krows[j] = ks;
          vrows[j] = vs;
        } else {
          acc_t* kd = kf.data() + j * head_dim;
          acc_t* vd = vf.data() + j * head_dim;
          to_acc(ks, kd, head_dim);
          to_acc(vs, vd, head_dim);
          krows[j] = kd;
          vrows[j] = vd;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t visible = std::min(nk, limit[r] - k0 + 1);  // keys k0 .. limit[r]
        if (visible <= 0) continue;
        acc_t block_max = neg_inf;
        for (int64_t j = 0; j < visible; ++j) {
          p[j] = dot(qf.data() + r * head_dim, krows[j], head_dim) * scale;
          block_max = std::max(block_max, p[j]);
        }
        const acc_t m_new = std::max(m[r], block_max);  // std::max skips NaN scores: they reach p[j] below
        // All scores so far -inf: nothing to attend yet (weights 0, as SDPA), not exp(-inf + inf) = NaN.
        const acc_t shift = m_new == neg_inf ? acc_t(0) : m_new;
        const acc_t alpha = std::exp(m[r] - shift);  // exp(-inf) = 0 on the first block
        acc_t sum = 0;
        for (int64_t j = 0; j < visible; ++j) {
          p[j] = std::exp(p[j] - shift);  // a NaN score stays NaN, so the row's l and output become NaN
          sum += p[j];
        }
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
        acc_t* __restrict__ a = acc.data() + r * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) a[d] *= alpha;
        for (int64_t j = 0; j < visible; ++j) {
          const acc_t* __restrict__ v = vrows[j];
          const acc_t pj = p[j];
          for (int64_t d = 0; d < head_dim; ++d) a[d] += pj * v[d];
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* o = part_o + (task * rows + r) * head_dim;
      // l = 0: nothing attended (zeros). l NaN (a NaN in q or a visible key) must propagate, not count as empty.
      const bool any = l[r] != acc_t(0);
      part_lse[task * rows + r] = any ? m[r] + std::log(l[r]) : neg_inf;
      const acc_t inv = any ? acc_t(1) / l[r] : acc_t(0);
      for (int64_t d = 0; d < head_dim; ++d) o[d] = acc[r * head_dim + d] * inv;
    }
  }
}

template <typename scalar_t>
void attend_tasks_default(const AttendCtx<scalar_t>& c, int64_t begin, int64_t end) {
  attend_tasks(c, begin, end);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define MIRAI_DECODE_AVX2 1
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void attend_tasks_avx2(const AttendCtx<scalar_t>& c, int64_t begin,
                                                           int64_t end) {
  attend_tasks(c, begin, end);
}

inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
#define MIRAI_DECODE_AVX2 0
#endif

template <typename scalar_t>
void decode_cpu_kernel(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                       const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                       const std::vector<int64_t>& seqlens, const c10::optional<at::Tensor>& rope_table,
                       double softmax_scale, int64_t num_splits, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), head_dim = q.size(3);
  const int64_t nheads_kv = k_cache.size(2), group = nheads / nheads_kv, half_dim = head_dim / 2;
  const bool appending = k_new.has_value();
  const float* table = rope_table.has_value() ? rope_table->const_data_ptr<float>() : nullptr;
  scalar_t* kc = k_cache.mutable_data_ptr<scalar_t>();
  scalar_t* vc = v_cache.mutable_data_ptr<scalar_t>();
  const int64_t skb = k_cache.stride(0), sks = k_cache.stride(1), skh = k_cache.stride(2);
  const int64_t svb = v_cache.stride(0), svs = v_cache.stride(1), svh = v_cache.stride(2);
  const scalar_t* qd = q.const_data_ptr<scalar_t>();
  const int64_t sqb = q.stride(0), sqs = q.stride(1), sqh = q.stride(2);

  auto position = [&](int64_t b, int64_t i) {  // absolute position of query i: L_b - S_q + i
    return seqlens[b] + (appending ? 0 : -seqlen_q) + i;
  };

  // 1. Append (rotating k_new). Before any read of the cache, so attention sees the new rows.
  if (appending) {
    const scalar_t* kn = k_new->const_data_ptr<scalar_t>();
    const scalar_t* vn = v_new->const_data_ptr<scalar_t>();
    const int64_t snb = k_new->stride(0), sns = k_new->stride(1), snh = k_new->stride(2);
    const int64_t tnb = v_new->stride(0), tns = v_new->stride(1), tnh = v_new->stride(2);
    at::parallel_for(0, batch * seqlen_q, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / seqlen_q, i = t % seqlen_q, row = position(b, i);
        for (int64_t h = 0; h < nheads_kv; ++h) {
          const scalar_t* ks = kn + b * snb + i * sns + h * snh;
          scalar_t* kd = kc + b * skb + row * sks + h * skh;
          if (table)
            rotate_row<scalar_t, acc_t>(ks, table + row * head_dim, half_dim, kd);
          else
            std::copy(ks, ks + head_dim, kd);
          const scalar_t* vs = vn + b * tnb + i * tns + h * tnh;
          std::copy(vs, vs + head_dim, vc + b * svb + row * svs + h * svh);
        }
      }
    });
  }

  // 2. Partial attention per (batch, kv head, split). Query rows of a task: r = i * group + g (head h_kv*group+g).
  const int64_t rows = seqlen_q * group;
  const int64_t tasks = batch * nheads_kv * num_splits;
  std::vector<acc_t> part_o(tasks * rows * head_dim);
  std::vector<acc_t> part_lse(tasks * rows);
  const acc_t scale = acc_t(softmax_scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  const AttendCtx<scalar_t> ctx{qd, sqb, sqs, sqh, kc, vc, skb, sks, skh, svb, svs, svh, seqlens.data(), table,
                                 appending, seqlen_q, group, nheads_kv, num_splits, head_dim, rows,
                                 part_o.data(), part_lse.data(), scale};
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
#if MIRAI_DECODE_AVX2
    if (cpu_has_avx2_fma()) return attend_tasks_avx2(ctx, begin, end);
#endif
    attend_tasks_default(ctx, begin, end);
  });

  // 3. Combine the splits of each query row by their log-sum-exp.
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, batch * nheads_kv * rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t % rows, bh = t / rows, b = bh / nheads_kv, hk = bh % nheads_kv;
      const int64_t i = r / group, h = hk * group + r % group;
      acc_t mx = neg_inf;
      bool nan_split = false;  // std::max skips NaN, so a NaN split is looked for explicitly
      for (int64_t s = 0; s < num_splits; ++s) {
        const acc_t lse = part_lse[(bh * num_splits + s) * rows + r];
        nan_split = nan_split || std::isnan(lse);
        mx = std::max(mx, lse);
      }
      std::fill(o.begin(), o.end(), nan_split ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0));
      if (!nan_split && mx != neg_inf) {
        acc_t wsum = 0;
        for (int64_t s = 0; s < num_splits; ++s) {
          const int64_t task = bh * num_splits + s;
          const acc_t w = std::exp(part_lse[task * rows + r] - mx);
          if (w == acc_t(0)) continue;
          wsum += w;
          const acc_t* po = part_o.data() + (task * rows + r) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) o[d] += w * po[d];
        }
        for (int64_t d = 0; d < head_dim; ++d) o[d] /= wsum;
      }
      scalar_t* dst = od + ((b * seqlen_q + i) * nheads + h) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = scalar_t(o[d]);
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                                const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& rope_table,
                                double softmax_scale, int64_t num_splits) {
  check_decode_inputs(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rope_table, at::kCPU);
  const int64_t batch = q.size(0), seqlen_q = q.size(1), max_seqlen = k_cache.size(1);
  const bool appending = k_new.has_value();
  // Reading cache_seqlens is free on CPU, so the value checks always run here, before anything is written.
  std::vector<int64_t> seqlens(batch);
  const int32_t* cs = cache_seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = cs[b * cache_seqlens.stride(0)];
    seqlens[b] = len;
    if (appending) {
      TORCH_CHECK(len >= 0 && len + seqlen_q <= max_seqlen, "decode_attention: cache too small for the append: ",
                  "cache_seqlens[", b, "] = ", len, " + seqlen_q ", seqlen_q, " > max_seqlen ", max_seqlen);
    } else {
      TORCH_CHECK(len >= seqlen_q && len <= max_seqlen, "decode_attention: without k_new the queries are the last ",
                  "seqlen_q cache rows, so seqlen_q (", seqlen_q, ") <= cache_seqlens[", b, "] = ", len,
                  " <= max_seqlen (", max_seqlen, ") is required");
    }
    if (rope_table.has_value()) {
      const int64_t last = len + (appending ? seqlen_q : 0) - 1;
      TORCH_CHECK(last < rope_table->size(0), "decode_attention: position ", last, " of sequence ", b,
                  " is past the rope_table's ", rope_table->size(0), " rows");
    }
  }
  auto out = at::empty({batch, seqlen_q, q.size(2), q.size(3)}, q.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(num_splits >= 0, "decode_attention: num_splits must be >= 0 (0 = heuristic), got ", num_splits);
  const int64_t splits = cpu_num_splits(num_splits, batch, k_cache.size(2), max_seqlen);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention_cpu", [&] {
    decode_cpu_kernel<scalar_t>(q, k_cache, v_cache, k_new, v_new, seqlens, rope_table, softmax_scale, splits, out);
  });
  return out;
}

}  // namespace

// The schema of mirai::decode_attention is declared once, in mirai_kernels/ops/decode.py; this is its CPU kernel.
TORCH_LIBRARY_IMPL(mirai, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace mirai

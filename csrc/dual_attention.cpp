// Dual (causal + bidirectional) attention, C++ CPU forward and backward.
//
// One pass over the keys of each query row feeds two online-softmax accumulators: C (keys j <= i) and U (keys
// j > i). The causal output is C; the bidirectional output is the log-sum-exp merge of C and U (docs/method.md,
// "The shared bidirectional pass"). For a query tile [i0, i1) the keys split into three regions: [0, i0) is all C,
// [i0, i1) is the diagonal block (split per row by the mask), [i1, S) is all U. Key chunks never straddle a region,
// so only the diagonal block needs two P@V products.
//
// Work is split over (batch, K/V head) with at::parallel_for: each task owns its heads' dQ and its K/V head's dK/dV
// (summed over the grouped query heads), so the backward needs no atomics. Inputs may be strided views (only the
// last dim contiguous): fp32 heads are read in place through their row strides, bf16/fp16 heads are widened into
// fp32 scratch per task, so every product accumulates in fp32.
// Matrix products go to the BLAS torch links (sgemm_, MKL in the pip wheels), looked up weakly so a torch without
// it still loads this library and uses the plain loops below. The row operations between the products (max,
// exp-sum, softmax gradient) have AVX-512 versions picked at run time; profile notes at their definitions.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace mirai {
namespace {

using cpu_vec::exp_approx;
using cpu_vec::use_avx512;
#ifdef MIRAI_HAVE_AVX512_PATH
using cpu_vec::exp16;
using cpu_vec::tail_mask;
#endif

constexpr int kBlockQ = 64;   // query tile rows (also the diagonal block's width)
constexpr int kBlockK = 256;  // key chunk width in the all-C and all-U regions (large: fewer rescales, bigger GEMMs)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major C[m x n] = alpha * op(A) op(B) + beta * C, op(A) = A (m x k, lda) or A^T (A stored k x m).
void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
          int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
#ifndef MIRAI_NO_BLAS  // define to test the fallback loops
  if (sgemm_ != nullptr) {
    // Column-major BLAS sees row-major matrices transposed: C^T = op(B)^T op(A)^T.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    sgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
    return;
  }
#endif
  for (int i = 0; i < m; ++i) {
    float* crow = c + (int64_t)i * ldc;
    for (int j = 0; j < n; ++j) crow[j] = beta == 0.f ? 0.f : beta * crow[j];
    for (int p = 0; p < k; ++p) {
      const float av = alpha * (trans_a ? a[(int64_t)p * lda + i] : a[(int64_t)i * lda + p]);
      if (!trans_b) {
        const float* brow = b + (int64_t)p * ldb;
        for (int j = 0; j < n; ++j) crow[j] += av * brow[j];
      } else {
        for (int j = 0; j < n; ++j) crow[j] += av * b[(int64_t)j * ldb + p];
      }
    }
  }
}

// AVX-512 versions of the row operations, picked at run time (cpu_vec.h: the build targets the baseline x86-64, and
// GCC's auto-vectorised clones of these loops spend as long on masks, serial horizontal sums and scalar tails as on
// the work: the exp and the row max were ~25% of the forward). Tails use masked loads/stores, so short rows (the
// diagonal block's 1..64 columns) stay vectorised.
#ifdef MIRAI_HAVE_AVX512_PATH
// GCC 12 flags its own masked-load intrinsics (_mm512_undefined_ps inside) as "used uninitialized": false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

MIRAI_AVX512 static float exp_shift_sum_avx512(const float* s, float* p, int n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), sh));
    const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), sh));
    _mm512_storeu_ps(p + j, e0);
    _mm512_storeu_ps(p + j + 16, e1);
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  for (; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : tail_mask(n - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), sh));
    _mm512_mask_storeu_ps(p + j, k, e);
    acc0 = _mm512_mask_add_ps(acc0, k, acc0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// Max over the non-NaN entries (-inf when none): the loaded value is the first operand, so a NaN lane keeps the
// running max.
MIRAI_AVX512 static float row_max_avx512(const float* s, int n) {
  __m512 m0 = _mm512_set1_ps(kNegInf), m1 = m0;
  int j = 0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm512_max_ps(_mm512_loadu_ps(s + j), m0);
    m1 = _mm512_max_ps(_mm512_loadu_ps(s + j + 16), m1);
  }
  for (; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : tail_mask(n - j);
    m0 = _mm512_mask_max_ps(m0, k, _mm512_maskz_loadu_ps(k, s + j), m0);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

// out[j] = p[j] * (dp[j] - d); out may alias dp.
MIRAI_AVX512 static void softmax_grad_avx512(const float* p, const float* dp, float* out, int n, float d) {
  const __m512 dv = _mm512_set1_ps(d);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : tail_mask(n - j);
    const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + j),
                                   _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j), dv));
    _mm512_mask_storeu_ps(out + j, k, g);
  }
}

MIRAI_AVX512 static float row_dot_avx512(const float* a, const float* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : tail_mask(n - j);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + j), _mm512_maskz_loadu_ps(k, b + j), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

#pragma GCC diagnostic pop
#endif

// p[j] = exp(s[j] - shift) for j < n; returns the sum.
MIRAI_CLONES float exp_shift_sum_portable(const float* s, float* p, int n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) {
    const float e = exp_approx(s[j] - shift);
    p[j] = e;
    sum += e;
  }
  return sum;
}

static inline float exp_shift_sum(const float* s, float* p, int n, float shift) {
#ifdef MIRAI_HAVE_AVX512_PATH
  if (use_avx512()) return exp_shift_sum_avx512(s, p, n, shift);
#endif
  return exp_shift_sum_portable(s, p, n, shift);
}

// out[j] = p[j] * (dp[j] - d) for j < n; out may alias dp.
MIRAI_CLONES void softmax_grad_portable(const float* p, const float* dp, float* out, int n, float d) {
#pragma omp simd
  for (int j = 0; j < n; ++j) out[j] = p[j] * (dp[j] - d);
}

static inline void softmax_grad_to(const float* p, const float* dp, float* out, int n, float d) {
#ifdef MIRAI_HAVE_AVX512_PATH
  if (use_avx512()) return softmax_grad_avx512(p, dp, out, n, d);
#endif
  softmax_grad_portable(p, dp, out, n, d);
}

// ds[j] = p[j] * (dp[j] - d) for j < n, in place on dp.
static inline void softmax_grad(const float* p, float* dp, int n, float d) { softmax_grad_to(p, dp, dp, n, d); }

MIRAI_CLONES float row_dot_portable(const float* a, const float* b, int n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

static inline float row_dot(const float* a, const float* b, int n) {
#ifdef MIRAI_HAVE_AVX512_PATH
  if (use_avx512()) return row_dot_avx512(a, b, n);
#endif
  return row_dot_portable(a, b, n);
}

// out[j] = x[j] + alpha * y[j]; out may alias x.
MIRAI_CLONES void axpy_row(const float* x, const float* y, float alpha, float* out, int n) {
#pragma omp simd
  for (int j = 0; j < n; ++j) out[j] = x[j] + alpha * y[j];
}

MIRAI_CLONES float row_max_portable(const float* s, int n) {
  // 16 independent lanes: a plain max reduction does not vectorise without -ffast-math.
  float lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = kNegInf;
  int j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) lanes[l] = s[j + l] > lanes[l] ? s[j + l] : lanes[l];
  float m = kNegInf;
  for (int l = 0; l < 16; ++l) m = lanes[l] > m ? lanes[l] : m;
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

static inline float row_max(const float* s, int n) {
#ifdef MIRAI_HAVE_AVX512_PATH
  if (use_avx512()) return row_max_avx512(s, n);
#endif
  return row_max_portable(s, n);
}

MIRAI_CLONES void scale_row(float* x, int n, float a) {
#pragma omp simd
  for (int j = 0; j < n; ++j) x[j] *= a;
}

// The finishing stores of a forward row (out = a * sa, or the merge a * sa + b * sb), as separate functions so
// they get vector clones: inlined into the forward they compiled to 4-wide SSE with spills, ~10% of the forward.
MIRAI_CLONES void scale_store_f32(const float* a, float sa, float* out, int n) {
#pragma omp simd
  for (int j = 0; j < n; ++j) out[j] = a[j] * sa;
}

MIRAI_CLONES void merge_store_f32(const float* a, float sa, const float* b, float sb, float* out, int n) {
#pragma omp simd
  for (int j = 0; j < n; ++j) out[j] = a[j] * sa + b[j] * sb;
}

template <typename T>
void scale_store(const float* a, float sa, T* out, int n) {
  if constexpr (std::is_same_v<T, float>) {
    scale_store_f32(a, sa, out, n);
  } else {
    for (int j = 0; j < n; ++j) out[j] = static_cast<T>(a[j] * sa);
  }
}

template <typename T>
void merge_store(const float* a, float sa, const float* b, float sb, T* out, int n) {
  if constexpr (std::is_same_v<T, float>) {
    merge_store_f32(a, sa, b, sb, out, n);
  } else {
    for (int j = 0; j < n; ++j) out[j] = static_cast<T>(a[j] * sa + b[j] * sb);
  }
}

// Rows of (B, S, H, D) tensors are H * D * 4 bytes apart (3 KiB for 12 heads of 64), beyond the strides the
// hardware prefetchers follow, so the row loops that read or write them cold (D = rowsum(dO * O), the output
// write-out) touch `ahead` rows early: ~4% of the backward went to those misses.
template <typename T>
static inline void prefetch_row(const T* row, int n, bool write) {
  const char* p = reinterpret_cast<const char*>(row);
  for (size_t off = 0; off < n * sizeof(T); off += 64) {
    if (write) __builtin_prefetch(p + off, 1, 3);
    else __builtin_prefetch(p + off, 0, 3);
  }
}
constexpr int kPrefetchRows = 4;

// True when rows x dim values (row stride ld) are all finite.
// x * 0 is 0 for finite x and NaN for NaN/Inf, so one vectorised sum per row tells (no branch per element).
MIRAI_CLONES static bool rows_finite(const float* x, int ld, int rows, int dim) {
  for (int i = 0; i < rows; ++i) {
    const float* row = x + (size_t)i * ld;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int d = 0; d < dim; ++d) acc += row[d] * 0.f;
    if (acc != 0.f) return false;
  }
  return true;
}

// One online-softmax accumulator over a tile of rows: running max, running sum, unnormalised output.
struct Accumulator {
  std::vector<float> m, l, acc;
  void reset(int rows, int dim) {
    m.assign(rows, kNegInf);
    l.assign(rows, 0.f);
    acc.assign((size_t)rows * dim, 0.f);
  }
  // Fold scores s[0..n) of row r into the running state; writes their probabilities (w.r.t. the new max) to p.
  void update_row(int r, const float* s, float* p, int n, int dim) {
    if (n <= 0) return;
    const float m_new = std::max(m[r], row_max(s, n));  // row_max skips NaN scores: they reach p via exp below
    if (m_new == kNegInf) {
      // Every score so far -inf (or NaN): weights 0 (nothing to attend yet, as SDPA) rather than
      // exp(-inf + inf) = NaN, unless a score is NaN, which must reach l and the output.
      bool any_nan = false;
      for (int j = 0; j < n; ++j) any_nan = any_nan || std::isnan(s[j]);
      if (!any_nan) {
        std::fill(p, p + n, 0.f);
        return;
      }
    }
    const float shift = m_new == kNegInf ? 0.f : m_new;
    const float corr = m[r] == kNegInf ? 0.f : exp_approx(m[r] - m_new);
    if (corr != 1.f) scale_row(acc.data() + (size_t)r * dim, dim, corr);
    l[r] = l[r] * corr + exp_shift_sum(s, p, n, shift);
    m[r] = m_new;
  }
};

template <typename T>
void load_rows(const T* src, int64_t row_stride, int rows, int dim, float scale, float* dst) {
  for (int i = 0; i < rows; ++i) {
    const T* s = src + i * row_stride;
    float* d = dst + (size_t)i * dim;
    for (int j = 0; j < dim; ++j) d[j] = scale * static_cast<float>(s[j]);
  }
}

// A head's rows as fp32: fp32 inputs are read in place (any row stride); other dtypes are widened into dst.
template <typename T>
const float* head_rows(const T* src, int64_t row_stride, int rows, int dim, float* dst, int& ld) {
  if constexpr (std::is_same_v<T, float>) {
    // BLAS needs a leading dimension >= the row length: broadcast (stride 0) or overlapping rows are copied.
    if (row_stride >= dim && row_stride <= std::numeric_limits<int>::max()) {
      ld = (int)row_stride;
      return src;
    }
  }
  load_rows(src, row_stride, rows, dim, 1.f, dst);
  ld = dim;
  return dst;
}

struct Strides {
  int64_t b, s, h;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float softmax_scale,
                    bool want_c, bool want_b, at::Tensor& out_c, at::Tensor& out_b, at::Tensor& lse_c,
                    at::Tensor& lse_b) {
  const int64_t B = q.size(0), H = q.size(2), Hk = k.size(2);
  const int S = (int)q.size(1), D = (int)q.size(3);
  const int64_t group = H / Hk;
  const Strides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* oc = want_c ? out_c.mutable_data_ptr<T>() : nullptr;
  T* ob = want_b ? out_b.mutable_data_ptr<T>() : nullptr;
  float* lc = want_c ? lse_c.mutable_data_ptr<float>() : nullptr;
  float* lb = want_b ? lse_b.mutable_data_ptr<float>() : nullptr;

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Q((size_t)S * D), K((size_t)S * D), V((size_t)S * D);
    const size_t tile = (size_t)kBlockQ * std::max(kBlockK, kBlockQ);
    std::vector<float> s_buf(tile), p_buf(tile),
        pu_buf((size_t)kBlockQ * kBlockQ);
    Accumulator C, U;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, hk = h / group;
      int ldq, ldk, ldv;
      const float* Qh = head_rows(qp + b * sq.b + h * sq.h, sq.s, S, D, Q.data(), ldq);
      const float* Kh = head_rows(kp + b * sk.b + hk * sk.h, sk.s, S, D, K.data(), ldk);
      const float* Vh = head_rows(vp + b * sv.b + hk * sv.h, sv.s, S, D, V.data(), ldv);
      for (int i0 = 0; i0 < S; i0 += kBlockQ) {
        const int bq = std::min(kBlockQ, S - i0);
        const float* Qt = Qh + (size_t)i0 * ldq;
        C.reset(bq, D);
        U.reset(bq, D);
        // Region C: keys [0, i0), all visible to every row of the tile.
        for (int j0 = 0; j0 < i0; j0 += kBlockK) {
          const int n = std::min(kBlockK, i0 - j0);
          gemm(false, true, bq, n, D, softmax_scale, Qt, ldq, Kh + (size_t)j0 * ldk, ldk, 0.f, s_buf.data(), n);
          for (int r = 0; r < bq; ++r) C.update_row(r, s_buf.data() + (size_t)r * n, p_buf.data() + (size_t)r * n, n, D);
          gemm(false, false, bq, D, n, 1.f, p_buf.data(), n, Vh + (size_t)j0 * ldv, ldv, 1.f, C.acc.data(), D);
        }
        // Diagonal block: keys [i0, i0 + bq); row r sees columns 0..r causally, r+1.. only bidirectionally.
        {
          const int n = bq;
          const float* Kd = Kh + (size_t)i0 * ldk;
          const float* Vd = Vh + (size_t)i0 * ldv;
          gemm(false, true, bq, n, D, softmax_scale, Qt, ldq, Kd, ldk, 0.f, s_buf.data(), n);
          for (int r = 0; r < bq; ++r) {
            float* s = s_buf.data() + (size_t)r * n;
            float* pc = p_buf.data() + (size_t)r * n;
            C.update_row(r, s, pc, r + 1, D);
            std::fill(pc + r + 1, pc + n, 0.f);
            if (want_b) {
              float* pu = pu_buf.data() + (size_t)r * n;
              std::fill(pu, pu + r + 1, 0.f);
              U.update_row(r, s + r + 1, pu + r + 1, n - r - 1, D);
            }
          }
          if (rows_finite(Vd, ldv, bq, D)) {
            gemm(false, false, bq, D, n, 1.f, p_buf.data(), n, Vd, ldv, 1.f, C.acc.data(), D);
          } else {
            // A non-finite value in the block: the GEMM would weight it by 0 in the rows before it (0 * NaN = NaN,
            // a future value reaching a causal row), so each row sums its visible columns only.
            for (int r = 0; r < bq; ++r) {
              float* a = C.acc.data() + (size_t)r * D;
              const float* pc = p_buf.data() + (size_t)r * n;
              for (int j = 0; j <= r; ++j) axpy_row(a, Vd + (size_t)j * ldv, pc[j], a, D);
            }
          }
          if (want_b) gemm(false, false, bq, D, n, 1.f, pu_buf.data(), n, Vd, ldv, 1.f, U.acc.data(), D);
        }
        // Region U: keys [i0 + bq, S), all in every row's future.
        if (want_b) {
          for (int j0 = i0 + bq; j0 < S; j0 += kBlockK) {
            const int n = std::min(kBlockK, S - j0);
            gemm(false, true, bq, n, D, softmax_scale, Qt, ldq, Kh + (size_t)j0 * ldk, ldk, 0.f, s_buf.data(), n);
            for (int r = 0; r < bq; ++r)
              U.update_row(r, s_buf.data() + (size_t)r * n, p_buf.data() + (size_t)r * n, n, D);
            gemm(false, false, bq, D, n, 1.f, p_buf.data(), n, Vh + (size_t)j0 * ldv, ldv, 1.f, U.acc.data(), D);
          }
        }
        // Finish: normalise C; merge C and U by log-sum-exp for the bidirectional row.
        for (int r = 0; r < bq; ++r) {
          const int64_t i = i0 + r;
          const float* ac = C.acc.data() + (size_t)r * D;
          const float* au = U.acc.data() + (size_t)r * D;
          const int64_t orow = ((b * S + i) * H + h) * D;
          if (r + kPrefetchRows < bq) {
            const int64_t ahead = orow + (int64_t)kPrefetchRows * H * D;
            if (want_c) prefetch_row(oc + ahead, D, true);
            if (want_b) prefetch_row(ob + ahead, D, true);
          }
          if (want_c) {
            // l = 0: every visible score was -inf, nothing attended (zeros, lse -inf); a NaN l propagates.
            const bool any = C.l[r] != 0.f;
            const float inv = any ? 1.f / C.l[r] : 0.f;
            scale_store(ac, inv, oc + orow, D);
            lc[(b * H + h) * S + i] = any ? C.m[r] + std::log(C.l[r]) : kNegInf;
          }
          if (want_b && C.l[r] == 0.f && U.l[r] == 0.f) {  // nothing attended (see above)
            for (int d = 0; d < D; ++d) ob[orow + d] = static_cast<T>(0.f);
            lb[(b * H + h) * S + i] = kNegInf;
          } else if (want_b) {
            const float mx = std::max(C.m[r], U.m[r]);
            const float wc = std::exp(C.m[r] - mx);
            const float wu = U.l[r] > 0.f ? std::exp(U.m[r] - mx) : 0.f;
            const float denom = C.l[r] * wc + U.l[r] * wu;
            const float ic = wc / denom, iu = wu / denom;
            merge_store(ac, ic, au, iu, ob + orow, D);
            lb[(b * H + h) * S + i] = mx + std::log(denom);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_attention_fwd_cpp(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double softmax_scale, bool causal,
    bool bidirectional, bool bidirectional_grad) {
  (void)bidirectional_grad;  // read by the autograd formula only
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "dual_attention: q, k, v must be 4-D (B, S, H, D)");
  TORCH_CHECK(k.sizes() == v.sizes(), "dual_attention: k and v shapes differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "dual_attention: q and k must agree on batch, seqlen and head_dim");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "dual_attention: nheads_k must divide nheads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "dual_attention: q, k, v dtypes differ");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "dual_attention: the last dim of q, k, v must be contiguous");
  TORCH_CHECK(q.device().is_cpu(), "dual_attention_fwd_cpp: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "dual_attention_fwd_cpp: dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2);
  auto opts = q.options();
  auto fopts = opts.dtype(at::kFloat);
  at::Tensor out_c = causal ? at::empty_like(q, at::MemoryFormat::Contiguous) : at::empty({0}, opts);
  at::Tensor out_b = bidirectional ? at::empty_like(q, at::MemoryFormat::Contiguous) : at::empty({0}, opts);
  at::Tensor lse_c = causal ? at::empty({B, H, S}, fopts) : at::empty({0}, fopts);
  at::Tensor lse_b = bidirectional ? at::empty({B, H, S}, fopts) : at::empty({0}, fopts);
  if (q.numel() > 0 && (causal || bidirectional)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "dual_attention_fwd_cpp", [&] {
      forward_kernel<scalar_t>(q, k, v, (float)softmax_scale, causal, bidirectional, out_c, out_b, lse_c, lse_b);
    });
  }
  return {out_c, out_b, lse_c, lse_b};
}

// Per query row, the backward reads one (lse, dO, D) triple for C keys and one for U keys (docs/method.md, "The
// shared bidirectional pass"):
// with both gradients alpha = exp(lse_c - lse_b), C uses (lse_c, dO_c + alpha dO_b, D_c + alpha D_b) and U uses
// (lse_b, dO_b, D_b); with only the causal gradient C uses (lse_c, dO_c, D_c) and U is skipped; with only the
// bidirectional gradient both use (lse_b, dO_b, D_b).
template <typename T>
void backward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out_c,
                     const at::Tensor& out_b, const at::Tensor& lse_c, const at::Tensor& lse_b,
                     const at::Tensor& dout_c, const at::Tensor& dout_b, bool has_c, bool has_b,
                     float softmax_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(2), Hk = k.size(2);
  const int S = (int)q.size(1), D = (int)q.size(3);
  const int64_t group = H / Hk;
  const Strides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v);
  Strides soc{}, sob{}, sdoc{}, sdob{};
  if (has_c) soc = strides_of(out_c), sdoc = strides_of(dout_c);
  if (has_b) sob = strides_of(out_b), sdob = strides_of(dout_b);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* ocp = has_c ? out_c.const_data_ptr<T>() : nullptr;
  const T* obp = has_b ? out_b.const_data_ptr<T>() : nullptr;
  const T* docp = has_c ? dout_c.const_data_ptr<T>() : nullptr;
  const T* dobp = has_b ? dout_b.const_data_ptr<T>() : nullptr;
  // lse tensors are made contiguous by the caller
  const float* lcp = has_c ? lse_c.const_data_ptr<float>() : nullptr;
  const float* lbp = has_b ? lse_b.const_data_ptr<float>() : nullptr;
  T* dqp = dq.mutable_data_ptr<T>();
  T* dkp = dk.mutable_data_ptr<T>();
  T* dvp = dv.mutable_data_ptr<T>();

  at::parallel_for(0, B * Hk, 1, [&](int64_t begin, int64_t end) {
    const size_t SD = (size_t)S * D;
    std::vector<float> Q(SD), K(SD), V(SD), dQ(SD), dK(SD), dV(SD), dOC(SD), dOU(SD), tmp(SD);
    std::vector<float> lseC(S), lseU(S), DC(S), DU(S);
    const size_t tile = (size_t)kBlockQ * std::max(kBlockK, kBlockQ);
    std::vector<float> s_buf(tile), p_buf(tile),
        dp_buf(tile), pu_buf((size_t)kBlockQ * kBlockQ), dpu_buf((size_t)kBlockQ * kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hk, hk = task % Hk;
      int ldq, ldk, ldv;
      const float* Kh = head_rows(kp + b * sk.b + hk * sk.h, sk.s, S, D, K.data(), ldk);
      const float* Vh = head_rows(vp + b * sv.b + hk * sv.h, sv.s, S, D, V.data(), ldv);
      std::fill(dK.begin(), dK.end(), 0.f);
      std::fill(dV.begin(), dV.end(), 0.f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const float* Qh = head_rows(qp + b * sq.b + h * sq.h, sq.s, S, D, Q.data(), ldq);
        std::fill(dQ.begin(), dQ.end(), 0.f);
        // Row terms D = rowsum(dO * O) and the per-region (lse, dO, D) triples; fp32 tensors are read in place.
        // One region's rows of dO (read in place when fp32), its D and its lse.
        auto region_terms = [&](const T* op, const Strides& so, const T* dop, const Strides& sdo, const float* lsep,
                                std::vector<float>& dO_buf, int& ld_do, std::vector<float>& Dr,
                                std::vector<float>& lse) {
          int ld_o;
          const float* Oh = head_rows(op + b * so.b + h * so.h, so.s, S, D, tmp.data(), ld_o);
          const float* dOh = head_rows(dop + b * sdo.b + h * sdo.h, sdo.s, S, D, dO_buf.data(), ld_do);
          for (int i = 0; i < S; ++i) {
            if (i + kPrefetchRows < S) {
              prefetch_row(dOh + (size_t)(i + kPrefetchRows) * ld_do, D, false);
              prefetch_row(Oh + (size_t)(i + kPrefetchRows) * ld_o, D, false);
            }
            Dr[i] = row_dot(dOh + (size_t)i * ld_do, Oh + (size_t)i * ld_o, D);
            lse[i] = lsep[(b * H + h) * S + i];
          }
          return dOh;
        };
        const float* dOCh = nullptr;
        const float* dOUh = nullptr;
        int ld_oc = D, ld_ou = D;
        if (has_c) dOCh = region_terms(ocp, soc, docp, sdoc, lcp, dOC, ld_oc, DC, lseC);
        if (has_b) {
          dOUh = region_terms(obp, sob, dobp, sdob, lbp, dOU, ld_ou, DU, lseU);
          if (has_c) {
            // dOC may alias the dOC buffer (widened input): the update is elementwise, so in place is fine.
            for (int i = 0; i < S; ++i) {
              const float alpha = std::exp(lseC[i] - lseU[i]);
              axpy_row(dOCh + (size_t)i * ld_oc, dOUh + (size_t)i * ld_ou, alpha, dOC.data() + (size_t)i * D, D);
              DC[i] += alpha * DU[i];
            }
            dOCh = dOC.data();
            ld_oc = D;
          } else {
            dOCh = dOUh;
            ld_oc = ld_ou;
            std::copy(DU.begin(), DU.end(), DC.begin());
            std::copy(lseU.begin(), lseU.end(), lseC.begin());
          }
        }
        for (int i0 = 0; i0 < S; i0 += kBlockQ) {
          const int bq = std::min(kBlockQ, S - i0);
          const float* Qt = Qh + (size_t)i0 * ldq;
          float* dQt = dQ.data() + (size_t)i0 * D;
          const float* dOCt = dOCh + (size_t)i0 * ld_oc;
          const float* dOUt = has_b ? dOUh + (size_t)i0 * ld_ou : nullptr;
          // A chunk of keys [j0, j0+n) that is entirely C (or entirely U) for this tile.
          auto full_chunk = [&](int j0, int n, const float* dOt, int ld_dot, const float* lse, const float* Drow) {
            const float* Kc = Kh + (size_t)j0 * ldk;
            const float* Vc = Vh + (size_t)j0 * ldv;
            gemm(false, true, bq, n, D, softmax_scale, Qt, ldq, Kc, ldk, 0.f, s_buf.data(), n);
            gemm(false, true, bq, n, D, 1.f, dOt, ld_dot, Vc, ldv, 0.f, dp_buf.data(), n);
            for (int r = 0; r < bq; ++r) {
              exp_shift_sum(s_buf.data() + (size_t)r * n, p_buf.data() + (size_t)r * n, n, lse[i0 + r]);
              softmax_grad(p_buf.data() + (size_t)r * n, dp_buf.data() + (size_t)r * n, n, Drow[i0 + r]);
            }
            gemm(true, false, n, D, bq, 1.f, p_buf.data(), n, dOt, ld_dot, 1.f, dV.data() + (size_t)j0 * D, D);
            gemm(true, false, n, D, bq, softmax_scale, dp_buf.data(), n, Qt, ldq, 1.f, dK.data() + (size_t)j0 * D, D);
            gemm(false, false, bq, D, n, 1.f, dp_buf.data(), n, Kc, ldk, 1.f, dQt, D);
          };
          for (int j0 = 0; j0 < i0; j0 += kBlockK) full_chunk(j0, std::min(kBlockK, i0 - j0), dOCt, ld_oc, lseC.data(), DC.data());
          {
            // Diagonal block: C probabilities on and below the diagonal, U above; dS merges both.
            const int n = bq;
            const float* Kd = Kh + (size_t)i0 * ldk;
            const float* Vd = Vh + (size_t)i0 * ldv;
            const bool u = has_b;
            gemm(false, true, bq, n, D, softmax_scale, Qt, ldq, Kd, ldk, 0.f, s_buf.data(), n);
            gemm(false, true, bq, n, D, 1.f, dOCt, ld_oc, Vd, ldv, 0.f, dp_buf.data(), n);
            if (u) gemm(false, true, bq, n, D, 1.f, dOUt, ld_ou, Vd, ldv, 0.f, dpu_buf.data(), n);
            for (int r = 0; r < bq; ++r) {
              const int i = i0 + r;
              const float* s = s_buf.data() + (size_t)r * n;
              float* pc = p_buf.data() + (size_t)r * n;
              float* dpc = dp_buf.data() + (size_t)r * n;
              exp_shift_sum(s, pc, r + 1, lseC[i]);
              softmax_grad(pc, dpc, r + 1, DC[i]);
              std::fill(pc + r + 1, pc + n, 0.f);
              if (u) {
                float* pu = pu_buf.data() + (size_t)r * n;
                const float* dpu = dpu_buf.data() + (size_t)r * n;
                std::fill(pu, pu + r + 1, 0.f);
                exp_shift_sum(s + r + 1, pu + r + 1, n - r - 1, lseU[i]);
                softmax_grad_to(pu + r + 1, dpu + r + 1, dpc + r + 1, n - r - 1, DU[i]);
              } else {
                std::fill(dpc + r + 1, dpc + n, 0.f);
              }
            }
            gemm(true, false, n, D, bq, 1.f, p_buf.data(), n, dOCt, ld_oc, 1.f, dV.data() + (size_t)i0 * D, D);
            if (u) gemm(true, false, n, D, bq, 1.f, pu_buf.data(), n, dOUt, ld_ou, 1.f, dV.data() + (size_t)i0 * D, D);
            gemm(true, false, n, D, bq, softmax_scale, dp_buf.data(), n, Qt, ldq, 1.f, dK.data() + (size_t)i0 * D, D);
            gemm(false, false, bq, D, n, 1.f, dp_buf.data(), n, Kd, ldk, 1.f, dQt, D);
          }
          if (has_b) {
            for (int j0 = i0 + bq; j0 < S; j0 += kBlockK)
              full_chunk(j0, std::min(kBlockK, S - j0), dOUt, ld_ou, lseU.data(), DU.data());
          }
        }
        T* dqrow = dqp + (b * S * H + h) * D;
        for (int i = 0; i < S; ++i) {
          if (i + kPrefetchRows < S) prefetch_row(dqrow + (int64_t)(i + kPrefetchRows) * H * D, D, true);
          scale_store(dQ.data() + (size_t)i * D, softmax_scale, dqrow + (int64_t)i * H * D, D);
        }
      }
      T* dkrow = dkp + (b * S * Hk + hk) * D;
      T* dvrow = dvp + (b * S * Hk + hk) * D;
      for (int i = 0; i < S; ++i) {
        if (i + kPrefetchRows < S) {
          prefetch_row(dkrow + (int64_t)(i + kPrefetchRows) * Hk * D, D, true);
          prefetch_row(dvrow + (int64_t)(i + kPrefetchRows) * Hk * D, D, true);
        }
        scale_store(dK.data() + (size_t)i * D, 1.f, dkrow + (int64_t)i * Hk * D, D);
        scale_store(dV.data() + (size_t)i * D, 1.f, dvrow + (int64_t)i * Hk * D, D);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_attention_bwd_cpp(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& out_c,
    const std::optional<at::Tensor>& out_b, const std::optional<at::Tensor>& lse_c,
    const std::optional<at::Tensor>& lse_b, const std::optional<at::Tensor>& dout_c,
    const std::optional<at::Tensor>& dout_b, double softmax_scale) {
  const bool has_c = dout_c.has_value() && dout_c->defined();
  const bool has_b = dout_b.has_value() && dout_b->defined();
  TORCH_CHECK(q.device().is_cpu(), "dual_attention_bwd_cpp: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "dual_attention_bwd_cpp: dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "dual_attention_bwd_cpp: the last dim of q, k, v must be contiguous");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && q.size(0) == k.size(0) &&
                  q.size(1) == k.size(1) && q.size(3) == k.size(3) && k.size(2) > 0 && q.size(2) % k.size(2) == 0,
              "dual_attention_bwd_cpp: q (B, S, H, D) and k, v (B, S, Hk, D) with Hk dividing H expected");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "dual_attention_bwd_cpp: q, k, v dtypes differ");
  const int64_t rows = q.size(0) * q.size(2) * q.size(1);
  auto check_rows = [&](const at::Tensor& t, const at::Tensor& lse, const char* name) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "dual_attention_bwd_cpp: ", name, " must have q's dtype");
    TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == rows,
                "dual_attention_bwd_cpp: lse for ", name, " must be float32 (B, H, S)");
  };
  at::Tensor oc, ob, lc, lb, doc, dob;
  if (has_c) {
    TORCH_CHECK(out_c.has_value() && lse_c.has_value(), "dual_attention_bwd_cpp: dout_c needs out_c and lse_c");
    oc = out_c->stride(3) == 1 ? *out_c : out_c->contiguous();
    doc = dout_c->stride(3) == 1 ? *dout_c : dout_c->contiguous();
    lc = lse_c->contiguous();
    TORCH_CHECK(oc.sizes() == q.sizes() && doc.sizes() == q.sizes(), "dual_attention_bwd_cpp: out_c/dout_c shape");
    check_rows(oc, lc, "out_c");
    check_rows(doc, lc, "dout_c");
  }
  if (has_b) {
    TORCH_CHECK(out_b.has_value() && lse_b.has_value(), "dual_attention_bwd_cpp: dout_b needs out_b and lse_b");
    ob = out_b->stride(3) == 1 ? *out_b : out_b->contiguous();
    dob = dout_b->stride(3) == 1 ? *dout_b : dout_b->contiguous();
    lb = lse_b->contiguous();
    TORCH_CHECK(ob.sizes() == q.sizes() && dob.sizes() == q.sizes(), "dual_attention_bwd_cpp: out_b/dout_b shape");
    check_rows(ob, lb, "out_b");
    check_rows(dob, lb, "dout_b");
  }
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (!has_c && !has_b) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  if (q.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "dual_attention_bwd_cpp", [&] {
    backward_kernel<scalar_t>(q, k, v, oc, ob, lc, lb, doc, dob, has_c, has_b, (float)softmax_scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

// The schemas of mirai::dual_attention_fwd / _bwd are declared once, in mirai_kernels/ops/dual_attention.py; these
// are their CPU kernels.
TORCH_LIBRARY_IMPL(mirai, CPU, m) {
  m.impl("dual_attention_fwd", &dual_attention_fwd_cpp);
  m.impl("dual_attention_bwd", &dual_attention_bwd_cpp);
}

}  // namespace mirai

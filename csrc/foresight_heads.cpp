// C++ CPU kernel of mirai::foresight_heads: Mirai's K foresight-head MLPs and the shifted cosine loss in one call,
// every gradient computed in the forward pass (the CPU path of mirai_kernels.ForesightHeads; the autograd formula
// around it, and when it applies, are in mirai_kernels/modules.py).
//
// h (B, N, d); targets (B, N, Z); tpos int32 (N, K), the pairing table of mirai::fused_linear_cosine_loss.
// weights = [w_in (K*H, d), w_mid_0 (K, H, H), ..., w_out (K, Z, H)], biases = [b_in (K*H,), b_mid_i (K, H),
// b_out (K, Z)]; depth = len(weights) >= 2, all of h's dtype. Head k (rows k*H:(k+1)*H of w_in and b_in):
//   a_0 = h w_in[k]^T + b_in[k],   a_{i+1} = silu(a_i) w_mid_i[k]^T + b_mid_i[k],
//   proj = silu(a_last) w_out[k]^T + b_out[k],   per_head[k] = -mean over (batch, valid pairs) of cos(proj, target).
// grad_mask: 1 + 2 * depth flags, whether h, w_in, b_in, w_mid_0, b_mid_0, ..., w_out, b_out want a gradient.
// Returns (per_head (K,) fp32 (fp64 for fp64), grad_h (B, N, d), [grad of each weight], [grad of each bias]): the
// gradients of sum_k grad_scale[k] * (-sum of head k's cosines), in h's dtype; an unwanted one is an empty tensor.
//
// Schedule. The GEMMs are the ones autograd would run; what differs is how they are cut and what runs between them:
// * Every layer is a set of independent tasks run with at::parallel_for, each calling single-threaded BLAS on its
//   slice: (head, block of rows) for the forward layers and the input-gradient chain, (head, block of columns)
//   for the weight gradients (a sum over all rows each, so no reduction between tasks). Measured on a 2-core
//   machine: two single-threaded 512^3 GEMMs run side by side at 1.3x the throughput of one 2-thread MKL GEMM.
// * The pass after each GEMM runs on the task's block while it is in cache: bias + SiLU + its derivative in the
//   forward layers (one exp per value; the GEMMs run without a bias broadcast), the cosine and its gradient on the
//   projection, the product with the stored SiLU derivative in the chain.
// * Activations and gradients are contiguous (K, B*N, H) buffers; a dead one takes the next layer's output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <tuple>
#include <vector>

#include "cpu_vec.h"
#include "foresight.h"

namespace mirai {
namespace {

// Forward / chain tasks split each head's rows in blocks of at least this many: the GEMMs keep their full-size
// throughput from 256 rows on (measured, 1 thread: M = 256 and 512 run at the same GFLOPS for N = K = 512, M = 128
// ~4% slower). Smaller blocks than needed to feed the threads only add BLAS packing: one thread runs whole heads.
constexpr int64_t kMinRowBlock = 256;
// Weight-gradient tasks split the output's columns in blocks of at least this many.
constexpr int64_t kMinColBlock = 128;

// ---------------------------------------------------------------------------------------------------------
// Row passes. s = silu(a + b), ds = silu'(a + b); silu(x) = x sig(x), silu'(x) = sig + silu (1 - sig).
// ---------------------------------------------------------------------------------------------------------

#ifdef MIRAI_HAVE_AVX512_PATH
#pragma GCC diagnostic push  // GCC 12's false "used uninitialized" on its own intrinsics (see cpu_vec.h)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
MIRAI_AVX512 static void bias_silu_row_avx512(float* a, const float* b, float* ds, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = cpu_vec::lanes_from(j, n);
    const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j));
    // sig = 1 / y, y = 1 + exp(-x) in [1, 1.7e38]: the 14-bit reciprocal and one Newton step (~2^-28 relative),
    // cheaper than a division (the division was ~1/3 of this pass).
    const __m512 y = _mm512_add_ps(one, cpu_vec::exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    const __m512 r = _mm512_rcp14_ps(y);
    const __m512 sig = _mm512_mul_ps(r, _mm512_fnmadd_ps(y, r, _mm512_set1_ps(2.0f)));
    const __m512 sv = _mm512_mul_ps(x, sig);
    _mm512_mask_storeu_ps(a + j, m, sv);
    _mm512_mask_storeu_ps(ds + j, m, _mm512_fmadd_ps(sv, _mm512_sub_ps(one, sig), sig));
  }
}
#pragma GCC diagnostic pop
#endif

MIRAI_CLONES void bias_silu_row_portable(float* a, const float* b, float* ds, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float x = a[j] + b[j];
    const float sig = 1.0f / (1.0f + cpu_vec::exp_approx(-x));
    const float sv = x * sig;
    a[j] = sv;
    ds[j] = sig + sv * (1.0f - sig);
  }
}

// In place: a (the GEMM's output) becomes the activation.
inline void bias_silu_row(float* a, const float* b, float* ds, int64_t n) {
#ifdef MIRAI_HAVE_AVX512_PATH
  if (cpu_vec::use_avx512()) return bias_silu_row_avx512(a, b, ds, n);
#endif
  bias_silu_row_portable(a, b, ds, n);
}

// fp64, fp16, bf16: libm exp in the accumulation type; ds is kept in that type (fp32 for fp16 / bf16), so the chain
// multiplies by an unrounded derivative, as silu_backward computes it.
template <typename scalar_t, typename acc_t>
void bias_silu_row(scalar_t* a, const scalar_t* b, acc_t* ds, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = acc_t(a[j]) + acc_t(b[j]);
    const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-x));
    const acc_t sv = x * sig;
    a[j] = scalar_t(sv);
    ds[j] = sig + sv * (acc_t(1) - sig);
  }
}

// g[j] *= ds[j] (the chain through a SiLU).
template <typename scalar_t, typename acc_t>
void times_derivative_row(scalar_t* g, const acc_t* ds, int64_t n) {
  for (int64_t j = 0; j < n; ++j) g[j] = scalar_t(acc_t(g[j]) * ds[j]);
}

MIRAI_CLONES void times_derivative_row_f32(float* g, const float* ds, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] *= ds[j];
}

template <>
void times_derivative_row<float, float>(float* g, const float* ds, int64_t n) {
  times_derivative_row_f32(g, ds, n);
}

// sums[j] += m[r * n + j] over `rows` rows, in fp64: the bias gradients, summed while the rows are in cache (a
// separate sum over the (K, B*N, H) gradient was ~1.5% of the step), in a precision no row count can degrade.
template <typename scalar_t>
void add_column_sums(const scalar_t* m, int64_t rows, int64_t n, double* sums) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) sums[j] += double(m[r * n + j]);
}

MIRAI_CLONES void add_column_sums_f32(const float* m, int64_t rows, int64_t n, double* sums) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sums[j] += double(m[r * n + j]);
  }
}

template <>
void add_column_sums<float>(const float* m, int64_t rows, int64_t n, double* sums) {
  add_column_sums_f32(m, rows, n, sums);
}

// One projection row p (+ bias) against its target row t (inverse norm inv_t): returns the cosine and overwrites p
// with d(-cos)/dp. Below eps the norm is the constant eps and only -t_hat / eps is left (reference/foresight.py).
// Inline in both instantiations below; the fp32 one gets vector clones.
template <typename scalar_t, typename acc_t>
inline acc_t neg_cos_grad_row_impl(scalar_t* p, const scalar_t* bias, const scalar_t* t, acc_t inv_t, int64_t n) {
  acc_t dot = 0, ss = 0;
#pragma omp simd reduction(+ : dot, ss)
  for (int64_t z = 0; z < n; ++z) {
    const acc_t sv = acc_t(p[z]) + acc_t(bias[z]);
    dot += sv * acc_t(t[z]);
    ss += sv * sv;
  }
  const acc_t norm_s = std::sqrt(ss);
  const acc_t inv_s = acc_t(1) / std::max(norm_s, acc_t(kForesightEps));
  const acc_t c = dot * inv_s * inv_t;
  // d cos / d s = (t_hat - cos s_hat) / |s| = a t - b s.
  const acc_t a = inv_t * inv_s;
  const acc_t b = norm_s >= acc_t(kForesightEps) ? c * inv_s * inv_s : acc_t(0);
#pragma omp simd
  for (int64_t z = 0; z < n; ++z) {
    const acc_t sv = acc_t(p[z]) + acc_t(bias[z]);
    p[z] = scalar_t(b * sv - a * acc_t(t[z]));
  }
  return c;
}

template <typename scalar_t, typename acc_t>
acc_t neg_cos_grad_row(scalar_t* p, const scalar_t* bias, const scalar_t* t, acc_t inv_t, int64_t n) {
  return neg_cos_grad_row_impl<scalar_t, acc_t>(p, bias, t, inv_t, n);
}

MIRAI_CLONES float neg_cos_grad_row_f32(float* p, const float* bias, const float* t, float inv_t, int64_t n) {
  return neg_cos_grad_row_impl<float, float>(p, bias, t, inv_t, n);
}

template <>
float neg_cos_grad_row<float, float>(float* p, const float* bias, const float* t, float inv_t, int64_t n) {
  return neg_cos_grad_row_f32(p, bias, t, inv_t, n);
}

// ---------------------------------------------------------------------------------------------------------
// The op
// ---------------------------------------------------------------------------------------------------------

void check_inputs(const at::Tensor& h, const at::Tensor& targets, const at::Tensor& tpos, at::TensorList weights,
                  at::TensorList biases, c10::ArrayRef<int64_t> grad_mask, c10::ArrayRef<double> grad_scale) {
  TORCH_CHECK(h.dim() == 3, "foresight_heads: h must be (B, N, d), got ", h.sizes());
  TORCH_CHECK(h.device().is_cpu() && targets.device().is_cpu() && tpos.device().is_cpu(),
              "foresight_heads_cpp: tensors must be on the CPU");
  const int64_t depth = weights.size();
  TORCH_CHECK(depth >= 2 && int64_t(biases.size()) == depth,
              "foresight_heads: needs depth >= 2 weights and as many biases, got ", depth, " and ", biases.size());
  TORCH_CHECK(int64_t(grad_mask.size()) == 1 + 2 * depth, "foresight_heads: grad_mask needs 1 + 2 * depth = ",
              1 + 2 * depth, " flags, got ", grad_mask.size());
  const auto& w_out = weights[depth - 1];
  TORCH_CHECK(w_out.dim() == 3, "foresight_heads: the last weight must be (K, Z, H), got ", w_out.sizes());
  const int64_t K = w_out.size(0), Z = w_out.size(1), H = w_out.size(2), d = h.size(2);
  auto expect = [&](const at::Tensor& t, c10::IntArrayRef shape, const char* what) {
    TORCH_CHECK(t.sizes() == shape, "foresight_heads: ", what, " must be ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == h.scalar_type() && t.device().is_cpu(), "foresight_heads: ", what,
                " must be a CPU tensor of h's dtype ", h.scalar_type(), ", got ", t.scalar_type(), " on ",
                t.device());
  };
  expect(weights[0], {K * H, d}, "w_in");
  expect(biases[0], {K * H}, "b_in");
  for (int64_t i = 1; i + 1 < depth; ++i) {
    expect(weights[i], {K, H, H}, "each middle weight");
    expect(biases[i], {K, H}, "each middle bias");
  }
  expect(biases[depth - 1], {K, Z}, "b_out");
  expect(targets, {h.size(0), h.size(1), Z}, "targets");
  TORCH_CHECK(tpos.scalar_type() == at::kInt && tpos.dim() == 2 && tpos.size(0) == h.size(1) && tpos.size(1) == K,
              "foresight_heads: tpos must be int32 (N, K) = (", h.size(1), ", ", K, "), got ", tpos.sizes(), " ",
              tpos.scalar_type());
  check_tpos_range(tpos, h.size(1), "foresight_heads");
  TORCH_CHECK(int64_t(grad_scale.size()) == K, "foresight_heads: grad_scale needs one entry per head (", K,
              "), got ", grad_scale.size());
}

// body(t) for every t in [0, n) on torch's threads, each thread claiming the next task when done with one: a thread
// slowed by another process on a shared machine then takes fewer tasks instead of holding the others at the
// region's end. Each task's arithmetic does not depend on the thread that runs it: results are bit for bit the same.
template <typename F>
void run_tasks(int64_t n, const F& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowAutograd below_autograd;  // a worker thread's own grad mode is on
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(t);
  });
}

// [begin, end) of block i of n items cut in blocks of `block`.
inline std::pair<int64_t, int64_t> block_range(int64_t i, int64_t block, int64_t n) {
  return {i * block, std::min(n, (i + 1) * block)};
}

// Blocks per head of `n` rows or columns: enough (head, block) tasks for every thread (about 2 per thread, so
// K = 3 heads on 2 threads balance; 1 per head on 1 thread), blocks of at least `min_block`.
int64_t blocks_per_head(int64_t K, int64_t n, int64_t min_block) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1) return 1;
  const int64_t wanted = (2 * threads + K - 1) / K;
  return std::max<int64_t>(1, std::min(wanted, n / min_block));
}

// ---------------------------------------------------------------------------------------------------------
// Work buffers kept between calls. The trunk's buffers are written once per call; fresh ones cost a page fault per
// 4 KiB on every call (malloc returns large blocks to the OS): measured ~4 ms of a ~37 ms step at the bench
// defaults and ~110 ms of ~1.85 s at GPT-B widths, batch 8 (270 MiB of buffers), 1 thread. So one process-wide
// buffer is kept and reused while it fits under MIRAI_CPU_WORKSPACE_MB (default 1024 MiB; 0 keeps none). It holds
// what the call would allocate anyway, between calls too. A call that finds it in use by another thread allocates
// its own.
// ---------------------------------------------------------------------------------------------------------

int64_t workspace_cap_bytes() {
  static const int64_t cap = [] {
    const char* v = std::getenv("MIRAI_CPU_WORKSPACE_MB");
    if (v == nullptr || v[0] == '\0') return int64_t(1024) << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    TORCH_CHECK(end != v && *end == '\0' && mb >= 0 && mb <= (int64_t(1) << 40),
                "MIRAI_CPU_WORKSPACE_MB must be a whole number of MiB >= 0 (0 keeps no workspace), got '", v, "'");
    return int64_t(mb) << 20;
  }();
  return cap;
}

struct WorkspaceLease {
  std::unique_lock<std::mutex> lock;  // held while the kept buffer is in use
  at::Tensor bytes;                   // uint8, at least the size asked for
  int64_t used = 0;

  // A (shape) tensor of `type` carved from the buffer, 64-byte aligned.
  at::Tensor carve(c10::IntArrayRef shape, at::ScalarType type) {
    const int64_t n = c10::multiply_integers(shape) * int64_t(c10::elementSize(type));
    auto view = bytes.narrow(0, used, n).view(type).view(shape);
    used += (n + 63) / 64 * 64;
    return view;
  }
};

WorkspaceLease lease_workspace(int64_t nbytes) {
  static std::mutex mutex;
  static at::Tensor* kept = new at::Tensor();  // never destroyed: no teardown order to get wrong at exit
  WorkspaceLease lease;
  if (nbytes <= workspace_cap_bytes()) {
    std::unique_lock<std::mutex> lock(mutex, std::try_to_lock);
    if (lock.owns_lock()) {
      if (!kept->defined() || kept->numel() < nbytes) {
        *kept = at::Tensor();  // free the smaller one first
        *kept = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
      }
      lease.lock = std::move(lock);
      lease.bytes = *kept;
      return lease;
    }
  }
  lease.bytes = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
  return lease;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> heads_kernel(
    const at::Tensor& h_in, const at::Tensor& targets_in, const at::Tensor& tpos_in, at::TensorList weights_in,
    at::TensorList biases_in, c10::ArrayRef<int64_t> grad_mask, c10::ArrayRef<double> grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t depth = weights_in.size(), n_mid = depth - 2;
  std::vector<at::Tensor> w, bias;
  for (int64_t i = 0; i < depth; ++i) {
    w.push_back(weights_in[i].contiguous());
    bias.push_back(biases_in[i].contiguous());
  }
  const int64_t B = h_in.size(0), N = h_in.size(1), d = h_in.size(2), R = B * N;
  const int64_t K = w[depth - 1].size(0), Z = w[depth - 1].size(1), H = w[depth - 1].size(2);
  const auto opts = h_in.options();
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::TensorOptions acc_opts = opts.dtype(acc_type);
  const auto h = h_in.reshape({R, d}).contiguous();
  const auto targets = targets_in.contiguous();
  const auto tpos = tpos_in.contiguous();
  auto wants = [&](int64_t i) { return grad_mask[i] != 0; };  // 0: h; 1 + 2i: weight i; 2 + 2i: bias i
  // An unwanted gradient is an empty tensor of its own (outputs must not alias one another).
  auto none = [&] { return at::empty({0}, opts); };
  std::vector<at::Tensor> grad_w, grad_b;
  for (int64_t i = 0; i < depth; ++i) {
    grad_w.push_back(none());
    grad_b.push_back(none());
  }
  at::Tensor grad_h = none();
  at::Tensor per_head = at::zeros({K}, acc_opts);
  if (R == 0 || K == 0) {  // no row: the loss is 0 and every wanted gradient exactly zero
    if (wants(0)) grad_h = at::zeros_like(h_in);
    for (int64_t i = 0; i < depth; ++i) {
      if (wants(1 + 2 * i)) grad_w[i] = at::zeros_like(w[i]);
      if (wants(2 + 2 * i)) grad_b[i] = at::zeros_like(bias[i]);
    }
    return {per_head, grad_h, grad_w, grad_b};
  }
  // How deep the chain must go. Layer 0 is the first Linear (output a_0), layer j <= n_mid the middle one with
  // output a_j: the gradient of a_j is needed when h or a parameter of a layer <= j wants one.
  std::vector<bool> need_a(n_mid + 1, false);
  for (int64_t j = 0; j <= n_mid; ++j) {
    need_a[j] = (j == 0 ? wants(0) : need_a[j - 1]) || wants(1 + 2 * j) || wants(2 + 2 * j);
  }

  const int64_t row_blocks = blocks_per_head(K, R, kMinRowBlock);
  const int64_t row_block = (R + row_blocks - 1) / row_blocks;
  const int64_t row_tasks = K * row_blocks;
  // One parallel region per layer (run_tasks); each task calls BLAS on its own slice, which runs single-threaded
  // inside the region (MKL in torch's wheels, as measured: 2 threads reach the BLAS-threaded GEMM floor or beat it).
  auto for_row_tasks = [&](const auto& body) {
    run_tasks(row_tasks, [&](int64_t t) {
      const auto [r0, r1] = block_range(t % row_blocks, row_block, R);
      if (r1 > r0) body(t / row_blocks, r0, r1);
    });
  };
  auto for_column_tasks = [&](int64_t cols, const auto& body) {
    const int64_t per_head_blocks = blocks_per_head(K, cols, kMinColBlock);
    const int64_t block = (cols + per_head_blocks - 1) / per_head_blocks;
    run_tasks(K * per_head_blocks, [&](int64_t t) {
      const auto [c0, c1] = block_range(t % per_head_blocks, block, cols);
      if (c1 > c0) body(t / per_head_blocks, c0, c1);
    });
  };

  // Bias gradients: each row task sums its rows' gradient into its own fp64 slot; the slots of a head are then
  // added in block order (deterministic for a thread count).
  auto bias_partials = [&](int64_t n) { return std::vector<double>(row_tasks * n, 0.0); };
  auto reduce_partials = [&](const std::vector<double>& part, int64_t n, c10::IntArrayRef shape,
                             c10::ArrayRef<double> scale) {
    auto sums = at::zeros({K, n}, opts.dtype(at::kDouble));
    double* out = sums.mutable_data_ptr<double>();
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t blk = 0; blk < row_blocks; ++blk) {
        const double* src = part.data() + (k * row_blocks + blk) * n;
        for (int64_t j = 0; j < n; ++j) out[k * n + j] += src[j];
      }
      if (!scale.empty())
        for (int64_t j = 0; j < n; ++j) out[k * n + j] *= scale[k];
    }
    return sums.to(opts.dtype()).view(shape);
  };
  // ---- Forward: acts[i] = silu(a_i), derivs[i] = silu'(a_i), both (K, R, H).
  const int64_t trunk = K * R * H, align = 64;
  auto padded = [&](int64_t n, at::ScalarType t) {
    return (n * int64_t(c10::elementSize(t)) + align - 1) / align * align;
  };
  WorkspaceLease work = lease_workspace((n_mid + 2) * padded(trunk, h_in.scalar_type()) +
                                        (n_mid + 1) * padded(trunk, acc_type) + padded(K * R * Z, h_in.scalar_type()));
  std::vector<at::Tensor> acts(n_mid + 1), derivs(n_mid + 1);
  for (int64_t i = 0; i <= n_mid; ++i) {
    acts[i] = work.carve({K, R, H}, h_in.scalar_type());
    derivs[i] = work.carve({K, R, H}, acc_type);
  }
  // Rows [r0, r1) of head k of g (the gradient of acts[layer]) become the gradient of a_layer; their column sums go
  // to `partial` when layer's bias wants a gradient.
  auto through_silu = [&](int64_t layer, int64_t k, int64_t r0, int64_t r1, scalar_t* g_rows,
                          std::vector<double>* partial) {
    const acc_t* ds = derivs[layer].select(0, k).const_data_ptr<acc_t>() + r0 * H;
    times_derivative_row<scalar_t, acc_t>(g_rows, ds, (r1 - r0) * H);
    if (partial != nullptr) {
      const int64_t slot = k * row_blocks + r0 / row_block;
      add_column_sums<scalar_t>(g_rows, r1 - r0, H, partial->data() + slot * H);
    }
  };

  const auto w_in_heads = w[0].view({K, H, d});
  const auto b_in_heads = bias[0].view({K, H});
  auto silu_rows = [&](int64_t layer, int64_t k, int64_t r0, int64_t r1, const at::Tensor& b) {
    scalar_t* a = acts[layer].select(0, k).mutable_data_ptr<scalar_t>();
    acc_t* ds = derivs[layer].select(0, k).mutable_data_ptr<acc_t>();
    const scalar_t* bk = b.select(0, k).const_data_ptr<scalar_t>();
    for (int64_t r = r0; r < r1; ++r) bias_silu_row(a + r * H, bk, ds + r * H, H);
  };
  for_row_tasks([&](int64_t k, int64_t r0, int64_t r1) {
    auto out = acts[0].select(0, k).narrow(0, r0, r1 - r0);
    at::mm_out(out, h.narrow(0, r0, r1 - r0), w_in_heads.select(0, k).t());
    silu_rows(0, k, r0, r1, b_in_heads);
  });
  for (int64_t i = 0; i < n_mid; ++i) {
    for_row_tasks([&](int64_t k, int64_t r0, int64_t r1) {
      auto out = acts[i + 1].select(0, k).narrow(0, r0, r1 - r0);
      at::mm_out(out, acts[i].select(0, k).narrow(0, r0, r1 - r0), w[1 + i].select(0, k).t());
      silu_rows(i + 1, k, r0, r1, bias[1 + i]);
    });
  }

  // ---- Last layer + cosine. proj rows become d(-cos)/dproj in place (dproj); g = grad of acts[n_mid], times its
  // SiLU derivative: the gradient of a_{n_mid}. grad_scale[k] rides on the GEMMs' alpha.
  const auto& x_last = acts[n_mid];
  auto dproj = work.carve({K, R, Z}, h_in.scalar_type());
  auto g = work.carve({K, R, H}, h_in.scalar_type());
  const at::Tensor inv_t = at::linalg_vector_norm(targets.to(acc_type), 2, {-1})
                         .clamp_min(kForesightEps)
                         .reciprocal()
                         .contiguous();  // (B, N): 1 / max(|t|, eps), shared by the heads
  std::vector<acc_t> cos_sums(row_tasks, acc_t(0));  // per task, summed in task order: deterministic
  std::vector<double> partial_out = wants(2 * depth) ? bias_partials(Z) : std::vector<double>();
  std::vector<double> partial_a = wants(2 + 2 * n_mid) ? bias_partials(H) : std::vector<double>();
  {
    const scalar_t* tp = targets.const_data_ptr<scalar_t>();
    const acc_t* it = inv_t.const_data_ptr<acc_t>();
    const int32_t* pairs = tpos.const_data_ptr<int32_t>();
    for_row_tasks([&](int64_t k, int64_t r0, int64_t r1) {
      const int64_t rows = r1 - r0;
      auto p = dproj.select(0, k).narrow(0, r0, rows);
      at::mm_out(p, x_last.select(0, k).narrow(0, r0, rows), w[depth - 1].select(0, k).t());
      scalar_t* pp = p.mutable_data_ptr<scalar_t>();
      const scalar_t* bk = bias[depth - 1].select(0, k).const_data_ptr<scalar_t>();
      acc_t sum = 0;
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = pp + (r - r0) * Z;
        const int64_t b = r / N, n = r % N;
        const int32_t q = pairs[n * K + k];
        if (q < 0) {
          std::fill(row, row + Z, scalar_t(0));
          continue;
        }
        sum += neg_cos_grad_row<scalar_t, acc_t>(row, bk, tp + (b * N + q) * Z, it[b * N + q], Z);
      }
      const int64_t slot = k * row_blocks + r0 / row_block;
      cos_sums[slot] = sum;
      if (!partial_out.empty()) add_column_sums<scalar_t>(pp, rows, Z, partial_out.data() + slot * Z);
      if (!need_a[n_mid]) return;
      auto gk = g.select(0, k).narrow(0, r0, rows);
      gk.addmm_(p, w[depth - 1].select(0, k), /*beta=*/0, /*alpha=*/grad_scale[k]);
      through_silu(n_mid, k, r0, r1, gk.mutable_data_ptr<scalar_t>(), partial_a.empty() ? nullptr : &partial_a);
    });
  }
  {
    const at::Tensor counts = ((tpos >= 0).sum(0).to(acc_type) * double(B)).contiguous();
    const acc_t* cp = counts.const_data_ptr<acc_t>();
    acc_t* ph = per_head.mutable_data_ptr<acc_t>();
    for (int64_t k = 0; k < K; ++k) {
      acc_t s = 0;
      for (int64_t blk = 0; blk < row_blocks; ++blk) s += cos_sums[k * row_blocks + blk];
      ph[k] = -s / std::max(cp[k], acc_t(1));
    }
  }
  if (wants(2 * depth - 1)) {
    grad_w[depth - 1] = at::empty({K, Z, H}, opts);
    for_column_tasks(H, [&](int64_t k, int64_t c0, int64_t c1) {
      auto out = grad_w[depth - 1].select(0, k).narrow(1, c0, c1 - c0);
      out.addmm_(dproj.select(0, k).t(), x_last.select(0, k).narrow(1, c0, c1 - c0), 0, grad_scale[k]);
    });
  }
  if (wants(2 * depth)) grad_b[depth - 1] = reduce_partials(partial_out, Z, {K, Z}, grad_scale);
  dproj = at::Tensor();
  // partial_a holds the column sums of g, the gradient of a_j (j = n_mid now), for bias j.
  auto bias_grad_of_a = [&](int64_t j) {
    return j == 0 ? reduce_partials(partial_a, H, {K * H}, {}) : reduce_partials(partial_a, H, {K, H}, {});
  };
  if (n_mid > 0 && !partial_a.empty()) grad_b[n_mid] = bias_grad_of_a(n_mid);

  // ---- Chain through the middle layers, last to first. g: the gradient of a_{i + 1}.
  for (int64_t i = n_mid - 1; i >= 0 && need_a[i + 1]; --i) {
    if (wants(3 + 2 * i)) {
      grad_w[1 + i] = at::empty({K, H, H}, opts);
      for_column_tasks(H, [&](int64_t k, int64_t c0, int64_t c1) {
        auto out = grad_w[1 + i].select(0, k).narrow(1, c0, c1 - c0);
        at::mm_out(out, g.select(0, k).t(), acts[i].select(0, k).narrow(1, c0, c1 - c0));
      });
    }
    if (!need_a[i]) break;
    // acts[i + 1] is dead (layer i + 1's GEMMs are done): it takes g @ w_mid_i times silu'(a_i).
    auto next = acts[i + 1];
    partial_a = wants(2 + 2 * i) ? bias_partials(H) : std::vector<double>();
    for_row_tasks([&](int64_t k, int64_t r0, int64_t r1) {
      auto out = next.select(0, k).narrow(0, r0, r1 - r0);
      at::mm_out(out, g.select(0, k).narrow(0, r0, r1 - r0), w[1 + i].select(0, k));
      through_silu(i, k, r0, r1, out.mutable_data_ptr<scalar_t>(), partial_a.empty() ? nullptr : &partial_a);
    });
    if (!partial_a.empty()) grad_b[i] = bias_grad_of_a(i);
    acts[i + 1] = at::Tensor();
    g = next;
  }
  derivs.clear();

  // ---- First layer. g: the gradient of a_0 (K, R, H).
  if (!need_a[0]) return {per_head, grad_h, grad_w, grad_b};
  if (wants(0)) {
    grad_h = at::empty({R, d}, opts);
    run_tasks(row_blocks, [&](int64_t blk) {
      const auto [r0, r1] = block_range(blk, row_block, R);
      if (r1 <= r0) return;
      auto out = grad_h.narrow(0, r0, r1 - r0);
      for (int64_t k = 0; k < K; ++k) {
        out.addmm_(g.select(0, k).narrow(0, r0, r1 - r0), w_in_heads.select(0, k), k == 0 ? 0 : 1, 1);
      }
    });
    grad_h = grad_h.view({B, N, d});
  }
  if (wants(1)) {
    grad_w[0] = at::empty({K * H, d}, opts);
    const auto gw_heads = grad_w[0].view({K, H, d});
    for_column_tasks(H, [&](int64_t k, int64_t c0, int64_t c1) {
      auto out = gw_heads.select(0, k).narrow(0, c0, c1 - c0);
      at::mm_out(out, g.select(0, k).narrow(1, c0, c1 - c0).t(), h);
    });
  }
  if (n_mid == 0 && wants(2)) grad_b[0] = bias_grad_of_a(0);  // (n_mid > 0: set by the chain)
  return {per_head, grad_h, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> foresight_heads_cpu(
    const at::Tensor& h, const at::Tensor& targets, const at::Tensor& tpos, at::TensorList weights,
    at::TensorList biases, c10::ArrayRef<int64_t> grad_mask, c10::ArrayRef<double> grad_scale) {
  check_inputs(h, targets, tpos, weights, biases, grad_mask, grad_scale);
  // The gradients are computed here: nothing below is recorded by autograd (the tasks' threads set it again).
  at::AutoDispatchBelowAutograd below_autograd;
  std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "foresight_heads_cpp", [&] {
    out = heads_kernel<scalar_t>(h, targets, tpos, weights, biases, grad_mask, grad_scale);
  });
  return out;
}

}  // namespace

// The schema is declared once, in mirai_kernels/ops/foresight.py.
TORCH_LIBRARY_IMPL(mirai, CPU, m) { m.impl("foresight_heads", &foresight_heads_cpu); }

}  // namespace mirai

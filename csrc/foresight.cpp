// C++ CPU backend of the shifted foresight cosine (CPU kernels of mirai::foresight_cosine_loss_fwd / _bwd).
//
// proj: (B, N, K, Z), any strides with unit last-dim stride. targets: (B, N, Z), unit last-dim stride, same dtype.
// tpos: int32 (N, K) contiguous, the target position of each (student position, foresight head), -1 for none.
// fwd -> cos (B, N, K) in the accumulation type (fp32; fp64 for fp64 inputs), 0 where tpos is -1.
// bwd(grad_cos) -> grad_proj (B, N, K, Z) contiguous, proj's dtype. Targets never get a gradient.
// cos(s, t) = <s, t> / (max(|s|, eps) max(|t|, eps)), eps = 1e-4, as mirai_kernels/reference/foresight.py.
//
// mirai::fused_linear_cosine_loss: the foresight heads' last Linear (optionally preceded by a SiLU on x: silu_input)
// fused with the cosine, gradients computed in the forward pass (measured faster than a chunked recompute in
// backward, for about the same saved bytes; see mirai_kernels/ops/foresight.py). x (B, N, K, H), weight (K, Z, H),
// bias (K, Z) or None, targets (B, N, Z), tpos. Returns per_head (K,) fp32/fp64 = -mean over (batch, valid pairs)
// of cos, and, when compute_grad, the gradients of grad_scale[k] * (-sum(cos)) per head k, all in x's dtype:
// grad_x (B, N, K, H) (a permuted view of a (K, B, N, H) buffer), grad_weight (K, Z, H) and grad_bias (K, Z)
// (empty tensors otherwise). grad_scale[k] is the expected upstream gradient of per_head[k] over B * pairs_k; the
// autograd formula (Python) rescales only when the real one differs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "foresight.h"

namespace mirai {
namespace {

constexpr double kEps = kForesightEps;

void check_cos_inputs(const at::Tensor& proj, const at::Tensor& targets, const at::Tensor& tpos) {
  TORCH_CHECK(proj.dim() == 4, "foresight_cos: proj must be (B, N, K, Z), got ", proj.sizes());
  TORCH_CHECK(targets.dim() == 3, "foresight_cos: targets must be (B, N, Z), got ", targets.sizes());
  TORCH_CHECK(proj.device().is_cpu() && targets.device().is_cpu() && tpos.device().is_cpu(),
              "foresight_cos_*_cpp: all tensors must be on the CPU");
  TORCH_CHECK(targets.size(0) == proj.size(0) && targets.size(1) == proj.size(1) && targets.size(2) == proj.size(3),
              "foresight_cos: targets ", targets.sizes(), " do not match proj ", proj.sizes(),
              " (expected (B, N, Z))");
  TORCH_CHECK(targets.scalar_type() == proj.scalar_type(), "foresight_cos: targets dtype ", targets.scalar_type(),
              " differs from proj dtype ", proj.scalar_type());
  TORCH_CHECK(proj.size(3) <= 1 || proj.stride(3) == 1, "foresight_cos: proj needs a unit last-dim stride");
  TORCH_CHECK(targets.size(2) <= 1 || targets.stride(2) == 1, "foresight_cos: targets need a unit last-dim stride");
  TORCH_CHECK(tpos.scalar_type() == at::kInt && tpos.dim() == 2 && tpos.size(0) == proj.size(1) &&
                  tpos.size(1) == proj.size(2) && tpos.is_contiguous(),
              "foresight_cos: tpos must be contiguous int32 (N, K) = (", proj.size(1), ", ", proj.size(2), "), got ",
              tpos.sizes(), " ", tpos.scalar_type());
}

}  // namespace

void check_tpos_range(const at::Tensor& tpos, int64_t n, const char* where) {
  const auto t_contig = tpos.contiguous();
  const int32_t* t = t_contig.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < t_contig.numel(); ++i) {
    TORCH_CHECK(t[i] >= -1 && t[i] < n, where, ": tpos values must lie in [-1, ", n, "), got ", t[i]);
  }
}

namespace {

void check_tpos_range(const at::Tensor& tpos, int64_t n) { mirai::check_tpos_range(tpos, n, "foresight_cos"); }

// 1 / max(|t|, eps) of every target row, shared by the K foresight heads that read it.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> target_inv_norms(const at::Tensor& targets) {
  const int64_t B = targets.size(0), N = targets.size(1), Z = targets.size(2);
  const int64_t stb = targets.stride(0), stn = targets.stride(1);
  const scalar_t* t = targets.const_data_ptr<scalar_t>();
  std::vector<acc_t> inv(B * N);
  at::parallel_for(0, B * N, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Z)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const scalar_t* tr = t + (r / N) * stb + (r % N) * stn;
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t z = 0; z < Z; ++z) ss += acc_t(tr[z]) * acc_t(tr[z]);
      inv[r] = acc_t(1) / std::max(std::sqrt(ss), acc_t(kEps));
    }
  });
  return inv;
}

template <typename scalar_t>
void cos_fwd_kernel(const at::Tensor& proj, const at::Tensor& targets, const at::Tensor& tpos, at::Tensor& cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = proj.size(0), N = proj.size(1), K = proj.size(2), Z = proj.size(3);
  const int64_t spb = proj.stride(0), spn = proj.stride(1), spk = proj.stride(2);
  const int64_t stb = targets.stride(0), stn = targets.stride(1);
  const scalar_t* p = proj.const_data_ptr<scalar_t>();
  const scalar_t* t = targets.const_data_ptr<scalar_t>();
  const int32_t* tp = tpos.const_data_ptr<int32_t>();
  acc_t* out = cos.mutable_data_ptr<acc_t>();
  const auto inv_t = target_inv_norms<scalar_t, acc_t>(targets);
  at::parallel_for(0, B * N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * Z)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / N, n = r % N;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t q = tp[n * K + k];
        if (q < 0) {
          out[r * K + k] = 0;
          continue;
        }
        const scalar_t* s = p + b * spb + n * spn + k * spk;
        const scalar_t* tr = t + b * stb + q * stn;
        acc_t dot = 0, ss = 0;
        // simd reduction: several partial sums, so the loop is not bound by one add's latency.
#pragma omp simd reduction(+ : dot, ss)
        for (int64_t z = 0; z < Z; ++z) {
          const acc_t sv = acc_t(s[z]);
          dot += sv * acc_t(tr[z]);
          ss += sv * sv;
        }
        out[r * K + k] = dot * inv_t[b * N + q] / std::max(std::sqrt(ss), acc_t(kEps));
      }
    }
  });
}

template <typename scalar_t>
//
// Fused-op extras: cos_out (when non-null) also receives the cosines; inv_t_in (when non-null) holds the targets'
// 1/max(|t|, eps), shared by the heads; bias (when non-null, Z values) is added to every proj row (s = p + bias) so the
// projection GEMM needs no bias pass.
void cos_bwd_kernel(const at::Tensor& grad_cos, const at::Tensor& proj, const at::Tensor& targets,
                    const at::Tensor& tpos, at::Tensor& grad, at::opmath_type<scalar_t>* cos_out = nullptr,
                    const at::opmath_type<scalar_t>* inv_t_in = nullptr, const scalar_t* bias = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = proj.size(0), N = proj.size(1), K = proj.size(2), Z = proj.size(3);
  const int64_t spb = proj.stride(0), spn = proj.stride(1), spk = proj.stride(2);
  const int64_t stb = targets.stride(0), stn = targets.stride(1);
  const int64_t sgb = grad_cos.stride(0), sgn = grad_cos.stride(1), sgk = grad_cos.stride(2);
  const scalar_t* p = proj.const_data_ptr<scalar_t>();
  const scalar_t* t = targets.const_data_ptr<scalar_t>();
  const acc_t* g = grad_cos.const_data_ptr<acc_t>();
  const int32_t* tp = tpos.const_data_ptr<int32_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  std::vector<acc_t> inv_t_own;
  if (inv_t_in == nullptr) inv_t_own = target_inv_norms<scalar_t, acc_t>(targets);
  const acc_t* inv_t = inv_t_in ? inv_t_in : inv_t_own.data();
  at::parallel_for(0, B * N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * Z)), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> srow(bias ? Z : 0);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / N, n = r % N;
      for (int64_t k = 0; k < K; ++k) {
        scalar_t* o = out + (r * K + k) * Z;
        const int32_t q = tp[n * K + k];
        const acc_t gk = q < 0 ? acc_t(0) : g[b * sgb + n * sgn + k * sgk];
        if (gk == acc_t(0) && (q < 0 || cos_out == nullptr)) {
          for (int64_t z = 0; z < Z; ++z) o[z] = scalar_t(0);
          if (cos_out) cos_out[r * K + k] = 0;
          continue;
        }
        const scalar_t* s = p + b * spb + n * spn + k * spk;
        const scalar_t* tr = t + b * stb + q * stn;
        acc_t dot = 0, ss = 0;
        if (bias) {
          acc_t* sr = srow.data();
#pragma omp simd reduction(+ : dot, ss)
          for (int64_t z = 0; z < Z; ++z) {
            const acc_t sv = acc_t(s[z]) + acc_t(bias[z]);
            sr[z] = sv;
            dot += sv * acc_t(tr[z]);
            ss += sv * sv;
          }
        } else {
#pragma omp simd reduction(+ : dot, ss)
          for (int64_t z = 0; z < Z; ++z) {
            const acc_t sv = acc_t(s[z]);
            dot += sv * acc_t(tr[z]);
            ss += sv * sv;
          }
        }
        const acc_t norm_s = std::sqrt(ss);
        const acc_t inv_s = acc_t(1) / std::max(norm_s, acc_t(kEps));
        const acc_t it = inv_t[b * N + q];
        const acc_t c = dot * inv_s * it;
        if (cos_out) cos_out[r * K + k] = c;
        // d cos / d s = (t_hat - cos * s_hat) / |s|; below eps the norm is the constant eps and only t_hat / eps is
        // left.
        const acc_t a = gk * it * inv_s;
        const acc_t bcoef = norm_s >= acc_t(kEps) ? gk * c * inv_s * inv_s : acc_t(0);
        if (bias) {
          const acc_t* sr = srow.data();
#pragma omp simd
          for (int64_t z = 0; z < Z; ++z) o[z] = scalar_t(a * acc_t(tr[z]) - bcoef * sr[z]);
        } else {
          for (int64_t z = 0; z < Z; ++z) o[z] = scalar_t(a * acc_t(tr[z]) - bcoef * acc_t(s[z]));
        }
      }
    }
  });
}

at::Tensor foresight_cos_fwd_cpu(const at::Tensor& proj, const at::Tensor& targets, const at::Tensor& tpos) {
  check_cos_inputs(proj, targets, tpos);
  check_tpos_range(tpos, proj.size(1));
  const auto acc = proj.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto cos = at::empty({proj.size(0), proj.size(1), proj.size(2)}, proj.options().dtype(acc));
  if (cos.numel() == 0) return cos;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, proj.scalar_type(), "foresight_cos_fwd_cpp",
                                  [&] { cos_fwd_kernel<scalar_t>(proj, targets, tpos, cos); });
  return cos;
}

// cos_out: when given, a contiguous (B, N, K) accumulation-type tensor that also receives the cosines (the fused
// op's forward needs both, and one pass over s and t gives both).
at::Tensor cos_bwd_impl(const at::Tensor& grad_cos, const at::Tensor& proj, const at::Tensor& targets,
                        const at::Tensor& tpos, at::Tensor* cos_out, const at::Tensor* inv_t = nullptr,
                        const at::Tensor* bias = nullptr, const at::Tensor* out = nullptr) {
  check_cos_inputs(proj, targets, tpos);
  check_tpos_range(tpos, proj.size(1));
  const auto acc = proj.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_cos.dim() == 3 && grad_cos.size(0) == proj.size(0) && grad_cos.size(1) == proj.size(1) &&
                  grad_cos.size(2) == proj.size(2),
              "foresight_cos_bwd: grad_cos must be (B, N, K), got ", grad_cos.sizes());
  TORCH_CHECK(grad_cos.device().is_cpu(), "foresight_cos_bwd_cpp: grad_cos must be on the CPU");
  const auto g = grad_cos.to(acc);
  // out: a contiguous buffer of proj's shape and dtype to write into (the fused op reuses one across heads).
  auto grad = out ? *out : at::empty(proj.sizes(), proj.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, proj.scalar_type(), "foresight_cos_bwd_cpp",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    cos_bwd_kernel<scalar_t>(
                                        g, proj, targets, tpos, grad,
                                        cos_out ? cos_out->mutable_data_ptr<acc_t>() : nullptr,
                                        inv_t ? inv_t->const_data_ptr<acc_t>() : nullptr,
                                        bias ? bias->const_data_ptr<scalar_t>() : nullptr);
                                  });
  return grad;
}

at::Tensor foresight_cos_bwd_cpu(const at::Tensor& grad_cos, const at::Tensor& proj, const at::Tensor& targets,
                                 const at::Tensor& tpos) {
  return cos_bwd_impl(grad_cos, proj, targets, tpos, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_cos_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& tpos, bool compute_grad, bool silu_input, int64_t chunk_rows, c10::ArrayRef<double> grad_scale) {
  TORCH_CHECK(x.dim() == 4, "fused_linear_cos: x must be (B, N, K, H), got ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), K = x.size(2), H = x.size(3);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == K && weight.size(2) == H,
              "fused_linear_cos: weight must be (K, Z, H) = (", K, ", Z, ", H, "), got ", weight.sizes());
  const int64_t Z = weight.size(1);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fused_linear_cos: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "fused_linear_cos_cpp: tensors must be on the CPU");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == K && bias->size(1) == Z,
                "fused_linear_cos: bias must be (K, Z) = (", K, ", ", Z, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device().is_cpu(),
                "fused_linear_cos: bias must be a CPU tensor of x's dtype");
  }
  TORCH_CHECK(targets.dim() == 3 && targets.size(0) == B && targets.size(1) == N && targets.size(2) == Z,
              "fused_linear_cos: targets must be (B, N, Z) = (", B, ", ", N, ", ", Z, "), got ", targets.sizes());
  TORCH_CHECK(tpos.scalar_type() == at::kInt && tpos.dim() == 2 && tpos.size(0) == N && tpos.size(1) == K,
              "fused_linear_cos: tpos must be int32 (N, K)");
  check_tpos_range(tpos, N);
  TORCH_CHECK(int64_t(grad_scale.size()) == K, "fused_linear_cos: grad_scale needs one entry per head (", K,
              "), got ", grad_scale.size());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto per_head = at::zeros({K}, x.options().dtype(acc));
  at::Tensor gx, gw, gb;
  // Chunks of whole sequences (a pair never leaves its sample) of about chunk_rows rows bound the live projection.
  const int64_t chunk = std::max<int64_t>(1, chunk_rows / std::max<int64_t>(1, N));
  // The weight gradient is kept until backward in x's dtype (as an eager bf16 Linear makes it); across several
  // chunks it is accumulated in fp32 first.
  const auto gw_dtype = (chunk >= B) ? x.scalar_type() : acc;
  at::Tensor gx_heads;  // (K, B, N, H): each head's chunk is contiguous, so GEMMs write it in place
  if (compute_grad) {
    gx_heads = at::empty({K, B, N, H}, x.options());
    gx = gx_heads.permute({1, 2, 0, 3});
    gw = at::empty({K, Z, H}, x.options().dtype(gw_dtype));  // the first chunk's GEMM writes it
    gb = at::zeros({K, Z}, x.options().dtype(acc));
  } else {
    gx = at::empty({0}, x.options());
    gw = at::empty({0}, x.options());
    gb = at::empty({0}, x.options());
  }
  if (B * N * K == 0) {
    // No row: every gradient is exactly zero (the GEMMs that would write gx and gw never run).
    if (compute_grad) {
      gx.zero_();
      gw.zero_();
    }
    return {per_head, gx, gw.to(x.scalar_type()), gb.to(x.scalar_type())};
  }
  const auto counts = (tpos >= 0).sum(0).to(acc) * double(B);
  std::vector<at::Tensor> tks, biases;
  for (int64_t k = 0; k < K; ++k) {
    tks.push_back(tpos.select(1, k).unsqueeze(1).contiguous());
    if (bias.has_value()) biases.push_back(bias->select(0, k).contiguous());
  }
  // Per-chunk work buffers, allocated once and reused by every head and chunk: fresh (rows, H) buffers per head
  // cost page faults on every call (measured ~1 ms per step of the heads at the bench defaults, 1 thread).
  const int64_t rows_max = std::min(B, chunk) * N;
  at::Tensor xk_buf, p_buf, dp_buf;
  if (silu_input) xk_buf = at::empty({rows_max, H}, x.options());
  if (compute_grad) {
    p_buf = at::empty({rows_max, Z}, x.options());
    dp_buf = at::empty({rows_max, Z}, x.options());
  }
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t b1 = std::min(B, b0 + chunk), bc = b1 - b0;
    const auto tch = targets.slice(0, b0, b1);
    // The targets' inverse norms, shared by the K heads.
    const auto inv_t = at::linalg_vector_norm(tch.to(acc), 2, {-1}).clamp_min(kEps).reciprocal().contiguous();
    for (int64_t k = 0; k < K; ++k) {
      const auto& tk = tks[k];
      const auto wk = weight.select(0, k);
      const auto xin = x.slice(0, b0, b1).select(2, k).reshape({bc * N, H});
      // With silu_input the chunk's activation is made here and dropped after use: the caller never stores it.
      at::Tensor xk = xin;
      if (silu_input) {
        xk = xk_buf.narrow(0, 0, bc * N);
        at::silu_out(xk, xin);
      }
      if (!compute_grad) {
        auto p = bias.has_value() ? at::addmm(biases[k], xk, wk.t()) : at::mm(xk, wk.t());
        per_head.select(0, k).sub_(foresight_cos_fwd_cpu(p.view({bc, N, 1, Z}), tch, tk).sum());
        continue;
      }
      // The bias is added inside the cosine kernel (no broadcast copy before the GEMM).
      auto p_rows = p_buf.narrow(0, 0, bc * N);
      at::mm_out(p_rows, xk, wk.t());
      const auto p = p_rows.view({bc, N, 1, Z});
      auto c = at::empty({bc, N, 1}, x.options().dtype(acc));
      const auto dp_out = dp_buf.narrow(0, 0, bc * N).view({bc, N, 1, Z});
      const auto dp = cos_bwd_impl(at::full_like(c, -1.0), p, tch, tk, &c, &inv_t,
                                   bias.has_value() ? &biases[k] : nullptr, &dp_out)
                          .view({bc * N, Z});
      per_head.select(0, k).sub_(c.sum());
      // dp is the gradient of -sum(cos); the GEMMs' alpha applies grad_scale[k] for free (beta = 0: the
      // uninitialised output is not read).
      const double sk = grad_scale[k];
      auto out = gx_heads.select(0, k).slice(0, b0, b1).view({bc * N, H});
      // The input-gradient GEMM writes straight into gx (alpha = sk); with silu_input the SiLU derivative is then
      // applied in place: no (rows, H) temporary and no separate scaling pass.
      out.addmm_(dp, wk, /*beta=*/0, /*alpha=*/sk);
      if (silu_input) at::silu_backward_out(out, out, xin);
      auto gwk = gw.select(0, k);
      if (gw.scalar_type() == x.scalar_type()) {
        gwk.addmm_(dp.t(), xk, /*beta=*/b0 == 0 ? 0 : 1, /*alpha=*/sk);
      } else if (b0 == 0) {
        gwk.copy_(at::mm(dp.t(), xk).mul_(sk));
      } else {
        gwk.add_(at::mm(dp.t(), xk).to(acc), sk);
      }
      gb.select(0, k).add_(dp.sum(0, /*keepdim=*/false, acc), sk);
    }
  }
  per_head.div_(counts.clamp_min(1));
  return {per_head, gx, gw.to(x.scalar_type()), gb.to(x.scalar_type())};
}

}  // namespace

// The schemas are declared once, in mirai_kernels/ops/foresight.py; these are the CPU kernels.
TORCH_LIBRARY_IMPL(mirai, CPU, m) {
  m.impl("foresight_cosine_loss_fwd", &foresight_cos_fwd_cpu);
  m.impl("foresight_cosine_loss_bwd", &foresight_cos_bwd_cpu);
  m.impl("fused_linear_cosine_loss", &fused_linear_cos_cpu);
}

}  // namespace mirai

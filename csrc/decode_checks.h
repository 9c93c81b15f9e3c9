// Input checks and shared definitions of the C++ CPU and CUDA faces of decode attention. The Python door checks the
// same things with friendlier messages; these keep the raw torch.ops.mirai.* entry points memory-safe when called
// directly (device *values* — cache_seqlens against the cache size — are checked only on CPU, where reading them
// costs no synchronisation).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mirai {

inline void check_decode_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                                const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& rope_table,
                                c10::DeviceType expected_device) {
  TORCH_CHECK(q.dim() == 4, "decode_attention: q must be (batch, seqlen_q, nheads, head_dim), got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "decode_attention: caches must be (batch, max_seqlen, nheads_kv, head_dim)");
  TORCH_CHECK(q.device().type() == expected_device, "decode_attention: q is on ", q.device(), ", expected ",
              c10::DeviceTypeName(expected_device));
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "decode_attention: k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes(), " differ");
  TORCH_CHECK(k_cache.size(0) == batch && k_cache.size(3) == head_dim, "decode_attention: caches ",
              k_cache.sizes(), " do not match q ", q.sizes());
  const int64_t nheads_kv = k_cache.size(2);
  TORCH_CHECK(nheads_kv > 0 && nheads % nheads_kv == 0, "decode_attention: nheads ", nheads,
              " is not a multiple of nheads_kv ", nheads_kv);
  for (const at::Tensor* t : {&q, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "decode_attention: q, caches, k_new, v_new must share a dtype");
    TORCH_CHECK(t->device() == q.device(), "decode_attention: all tensors must be on ", q.device());
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "decode_attention: unit last-dim stride required");
  }
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "decode_attention: pass both k_new and v_new or neither");
  if (k_new.has_value()) {
    for (const at::Tensor* t : {&*k_new, &*v_new}) {
      TORCH_CHECK(t->dim() == 4 && t->size(0) == batch && t->size(1) == seqlen_q && t->size(2) == nheads_kv &&
                      t->size(3) == head_dim,
                  "decode_attention: k_new/v_new must be (batch, seqlen_q, nheads_kv, head_dim), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == q.scalar_type(), "decode_attention: q, caches, k_new, v_new must share a dtype");
      TORCH_CHECK(t->device() == q.device(), "decode_attention: all tensors must be on ", q.device());
      TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "decode_attention: unit last-dim stride required");
    }
  }
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch,
              "decode_attention: cache_seqlens must be (batch,), got ", cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "decode_attention: cache_seqlens must be int32, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.device() == q.device(), "decode_attention: cache_seqlens is on ",
              cache_seqlens.device(), ", q on ", q.device());
  if (rope_table.has_value()) {
    const auto& t = *rope_table;
    TORCH_CHECK(head_dim % 2 == 0, "decode_attention: rope needs an even head_dim");
    TORCH_CHECK(t.dim() == 3 && t.size(1) == head_dim / 2 && t.size(2) == 2,
                "decode_attention: rope_table must be (rows, head_dim/2, 2), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "decode_attention: rope_table must be float32");
    TORCH_CHECK(t.is_contiguous(), "decode_attention: rope_table must be contiguous");
    TORCH_CHECK(t.device() == q.device(), "decode_attention: rope_table is on ", t.device(), ", q on ", q.device());
  }
}

}  // namespace mirai

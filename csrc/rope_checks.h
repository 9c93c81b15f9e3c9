// Input checks shared by the C++ CPU and CUDA faces of the 2D RoPE. The Python door checks the same things with
// friendlier messages; these keep the raw torch.ops.mirai.* entry points memory-safe when called directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mirai {

inline void check_rope_inputs(const at::Tensor& x, const at::Tensor& table, const c10::optional<at::Tensor>& positions,
                              c10::DeviceType expected_device) {
  TORCH_CHECK(x.dim() == 4, "apply_rope_2d: x must be (batch, seqlen, nheads, head_dim), got ", x.dim(), " dims");
  TORCH_CHECK(x.device().type() == expected_device, "apply_rope_2d: x is on ", x.device(), ", expected ",
              c10::DeviceTypeName(expected_device));
  TORCH_CHECK(x.size(3) % 2 == 0, "apply_rope_2d: head_dim must be even, got ", x.size(3));
  TORCH_CHECK(x.size(3) <= 1 || x.stride(3) == 1, "apply_rope_2d: x must have a unit last-dim stride, got ",
              x.stride(3));
  TORCH_CHECK(table.dim() == 3 && table.size(1) == x.size(3) / 2 && table.size(2) == 2,
              "apply_rope_2d: table must be (rows, head_dim/2 = ", x.size(3) / 2, ", 2), got ", table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kFloat, "apply_rope_2d: table must be float32, got ", table.scalar_type());
  TORCH_CHECK(table.is_contiguous(), "apply_rope_2d: table must be contiguous");
  TORCH_CHECK(table.device() == x.device(), "apply_rope_2d: table is on ", table.device(), ", x on ", x.device());
  if (positions.has_value()) {
    const auto& pos = *positions;
    TORCH_CHECK(pos.scalar_type() == at::kInt, "apply_rope_2d: positions must be int32, got ", pos.scalar_type());
    TORCH_CHECK(pos.device() == x.device(), "apply_rope_2d: positions is on ", pos.device(), ", x on ", x.device());
    TORCH_CHECK((pos.dim() == 1 && pos.size(0) == x.size(1)) ||
                    (pos.dim() == 2 && pos.size(0) == x.size(0) && pos.size(1) == x.size(1)),
                "apply_rope_2d: positions must be (seqlen,) or (batch, seqlen), got ", pos.sizes());
  } else {
    TORCH_CHECK(x.size(1) <= table.size(0), "apply_rope_2d: seqlen ", x.size(1), " exceeds the table's ",
                table.size(0), " rows");
  }
}

}  // namespace mirai

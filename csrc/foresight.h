// Shared by the foresight kernels (foresight.cpp, foresight_heads.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mirai {

// cos(s, t) = <s, t> / (max(|s|, eps) max(|t|, eps)): keeps every gradient finite in fp16. The same constant as
// mirai_kernels/reference/foresight.py's EPS (tests/test_foresight_heads_cpu.py checks they agree).
constexpr double kForesightEps = 1e-4;

// Raises (message prefixed by `where`) on a pairing-table entry outside [-1, n): it would read past the targets.
// tpos: int32. Cheap on CPU (N*K ints).
void check_tpos_range(const at::Tensor& tpos, int64_t n, const char* where);

}  // namespace mirai

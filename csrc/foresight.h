// Shared by the foresight kernels (foresight.cpp, foresight_heads.cpp).
#pragma once

namespace mirai {

// cos(s, t) = <s, t> / (max(|s|, eps) max(|t|, eps)): keeps every gradient finite in fp16. The same constant as
// mirai_kernels/reference/foresight.py's EPS (tests/test_foresight_heads_cpu.py checks they agree).
constexpr double kForesightEps = 1e-4;

}  // namespace mirai

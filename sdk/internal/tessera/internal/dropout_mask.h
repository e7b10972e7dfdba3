// The mask tessera::dropout draws on the CPU, for the SDK's fused kernels that apply
// dropout themselves (low_rank_group): the same draws, the same p rounding (dropout.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tessera::internal {

// The p a CPU mask keeps with: p rounded to a multiple of 2^-15.
double rounded_dropout(double p);

// n keep flags from the default CPU generator, as tessera::dropout draws them: (n) bool on
// the CPU, each true with probability 1 − rounded_dropout(p). p in (0, 1) after rounding.
at::Tensor draw_keep(std::int64_t n, double p);

// x ∘ keep · c, keep bool of x's shape: one pass on the CPU in float32 (a bool operand of
// torch's mul is first converted to float, a pass and a tensor of its own); torch's ops
// elsewhere.
at::Tensor masked_scale(const at::Tensor& x, const at::Tensor& keep, double c);

// acc += t ∘ keep, in place; acc, t of one shape and dtype, keep bool of that shape.
void masked_add_(at::Tensor& acc, const at::Tensor& t, const at::Tensor& keep);

}  // namespace tessera::internal

// y = s · (x Aᵀ) Bᵀ, the low-rank update LoRA and its kin add to a linear site, with a
// backward of its own.
//
// Autograd's two chained at::linear calls compute the same values, but on the CPU they hand
// MKL the skinny products of a rank-r update in its slowest orientations: ∂B = s · gᵀ u
// ((out × n)(n × r)) runs ~4× slower than the same numbers as (uᵀ g)ᵀ, and x Aᵀ and g B
// (an inner dimension of `in` or `out` for r outputs) ~3× slower than on oneDNN. Here each
// product runs where it is fastest (measured at 640 rows of SmolLM2's shapes, r = 8):
//   forward   u = x Aᵀ (dense_linear: oneDNN on the CPU),  y = u (s B)ᵀ
//   backward  ∂u = g (s B) (dense_linear),  ∂B = s (uᵀ g)ᵀ,  ∂A = ∂uᵀ x,  ∂x = ∂u A
// and the scaling is folded into B (r × out) instead of a pass over the (n × out) output.
// A and B may be float32 masters of a half-precision x: the products run in x's dtype and
// their gradients arrive in the masters' dtype. Second derivatives are not supported.
#pragma once

#include <ATen/core/Tensor.h>

namespace tessera {

// x: (..., in), A: (r, in), B: (out, r) -> (..., out) in x's dtype.
at::Tensor low_rank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scaling);

}  // namespace tessera

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
// low_rank_group (SDK 2.6) runs several updates of one input together, with their dropout.
#pragma once

#include <tessera/abi.h>

#include <ATen/core/Tensor.h>

#include <vector>

namespace tessera {

// x: (..., in), A: (r, in), B: (out, r) -> (..., out) in x's dtype.
at::Tensor low_rank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scaling);

#if TESSERA_TARGET_ABI_MINOR >= 6
// Since SDK 2.6. One low-rank update's factors: A (r, in), B (out, r), y = s · (x Aᵀ) Bᵀ.
struct LowRankFactors {
  at::Tensor A;
  at::Tensor B;
  double scaling = 1.0;
};

// Since SDK 2.6. Several low-rank updates of one input — the q, k and v projections of an
// attention read the same x — each on its own inverted dropout of x, as tessera::dropout
// draws it (PEFT's semantics: every adapter has its own mask):
//   y_i = s_i · (drop_i(x) A_iᵀ) B_iᵀ,   drop_i(x) = x ∘ keep_i / (1 − p)
// computed together. In training with p > 0 the masks are drawn in one pass and kept as
// bytes, 1/(1 − p) is folded into s_i B_i, and ∂x = Σ_i (∂u_i A_i) ∘ keep_i is summed in
// one pass; without dropout (p = 0, or not training) the A products run as one product of
// Σ r_i rows, x [A_1; …; A_m]ᵀ, in the forward pass, in ∂x and in ∂A. Each y_i equals
// low_rank(dropout(x, p, training), A_i, B_i, s_i) up to rounding and the masks' draws.
// x: (..., in); every A_i: (r_i, in) -> y_i: (..., out_i) in x's dtype. Throws
// std::invalid_argument for p outside [0, 1).
std::vector<at::Tensor> low_rank_group(const at::Tensor& x, const std::vector<LowRankFactors>& updates, double dropout, bool training);
#endif

#if TESSERA_TARGET_ABI_MINOR >= 8
// Since SDK 2.8. y = s · ((x Aᵀ) ∘ rows) Bᵀ: the update with a weight per row of x applied to
// its r-wide product — a gated group's gate inside LoRA (LinearSite::add_row_scaled_branch).
// rows broadcasts against x's leading dimensions with a last size of 1 ((B, 1, 1) or (B, T, 1)
// for x (B, T, in), (N, 1) for x (N, in)); its gradient is Σ_r ∂u ∘ u, r wide. Undefined rows:
// low_rank(x, A, B, s).
at::Tensor low_rank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scaling, const at::Tensor& rows);

// Since SDK 2.8. low_rank_group with a weight per row for each update, on its r-wide product:
// y_i = s_i · ((drop_i(x) A_iᵀ) ∘ rows_i) B_iᵀ, each rows_i as low_rank's (LoRA's q, k and v in a
// gated group: LinearSite::row_weights gives each site's). rows: one per update, or none (the
// overload above). Throws std::invalid_argument for another count.
std::vector<at::Tensor> low_rank_group(const at::Tensor& x, const std::vector<LowRankFactors>& updates, double dropout, bool training,
                                       const std::vector<at::Tensor>& rows);
#endif

}  // namespace tessera

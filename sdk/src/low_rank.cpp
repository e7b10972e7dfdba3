#include <tessera/low_rank.h>

#include <tessera/dense_linear.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

namespace tessera {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// t's shape with its last size replaced.
std::vector<std::int64_t> with_last(const at::Tensor& t, std::int64_t last) {
  auto shape = t.sizes().vec();
  shape.back() = last;
  return shape;
}

// x2 (n, in), A (r, in), sB (out, r) -> (n, out). Returns u = x2 Aᵀ too (backward keeps it).
std::pair<at::Tensor, at::Tensor> forward_rows(const at::Tensor& x2, const at::Tensor& A, const at::Tensor& sB) {
  at::Tensor u = dense_linear(x2, A);  // (n, r)
  return {at::mm(u, sB.t()), u};       // (n, out)
}

struct LowRank : torch::autograd::Function<LowRank> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double s) {
    const auto in = x.size(-1);
    const at::Tensor x2 = x.reshape({-1, in});                 // (n, in)
    const at::Tensor Ax = A.to(x.scalar_type());               // (r, in)
    const at::Tensor sB = B.to(x.scalar_type()) * s;           // (out, r)
    auto [y, u] = forward_rows(x2, Ax, sB);
    // x is needed only for ∂A: a frozen A (LoRA-FA) keeps just the r-wide u, so a dropped
    // input (a tensor of this branch alone) is freed after the forward pass.
    ctx->save_for_backward({A.requires_grad() ? x2 : at::Tensor(), u, Ax, sB});
    ctx->saved_data["s"] = s;
    ctx->saved_data["A_dtype"] = static_cast<std::int64_t>(A.scalar_type());  // the masters' gradients arrive in their dtype
    ctx->saved_data["B_dtype"] = static_cast<std::int64_t>(B.scalar_type());
    return y.view(with_last(x, B.size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &u = saved[1], &Ax = saved[2], &sB = saved[3];
    const double s = ctx->saved_data["s"].toDouble();
    const at::Tensor g = grad_out[0].reshape({-1, sB.size(0)});  // (n, out)
    const at::Tensor gu = dense_linear(g, sB.t());                // (n, r) = g (s B)
    at::Tensor gx, gA, gB;
    if (ctx->needs_input_grad(0)) gx = at::mm(gu, Ax).view(with_last(grad_out[0], Ax.size(1)));  // (..., in)
    auto dtype = [&](const char* key) { return static_cast<at::ScalarType>(ctx->saved_data[key].toInt()); };
    if (ctx->needs_input_grad(1)) gA = at::mm(gu.t(), x2).to(dtype("A_dtype"));                      // (r, in)
    if (ctx->needs_input_grad(2)) gB = at::mm(u.t(), g).t().mul(s).contiguous().to(dtype("B_dtype"));  // (out, r)
    return {gx, gA, gB, at::Tensor()};
  }
};

}  // namespace

at::Tensor low_rank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scaling) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(0) == B.size(1) && x.size(-1) == A.size(1), "low_rank: x ", x.sizes(), ", A ",
              A.sizes(), ", B ", B.sizes(), " do not chain as x Aᵀ Bᵀ");
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || A.requires_grad() || B.requires_grad());
  if (grad) return LowRank::apply(x, A, B, scaling);
  // Nothing to record: the same products, without the autograd node.
  const at::Tensor sB = B.to(x.scalar_type()) * scaling;
  return forward_rows(x.reshape({-1, x.size(-1)}), A.to(x.scalar_type()), sB).first.view(with_last(x, B.size(0)));
}

}  // namespace tessera

// tessera::dense_linear — see tessera/dense_linear.h for why oneDNN on the CPU.
#include <tessera/dense_linear.h>
#include <tessera/internal/sites_impl.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>

namespace tessera {
namespace {

// libtorch's registered oneDNN ops (aten/src/ATen/native/mkldnn/Linear.cpp):
//   mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algorithm?)    act(X Wᵀ + B)
//   mkldnn::_linear_pointwise.binary(X, other, W, B?, attr)           (X Wᵀ + B) <attr> other
using Unary = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                         c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);
using Binary = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view);

template <class Signature>
std::optional<c10::TypedOperatorHandle<Signature>> find_op(const char* name, const char* overload) {
  if (!at::hasMKLDNN()) return std::nullopt;  // a libtorch built without oneDNN
  auto handle = c10::Dispatcher::singleton().findSchema({name, overload});
  if (!handle) return std::nullopt;
  return handle->typed<Signature>();
}

const std::optional<c10::TypedOperatorHandle<Unary>>& unary() {
  static const auto op = find_op<Unary>("mkldnn::_linear_pointwise", "");
  return op;
}

const std::optional<c10::TypedOperatorHandle<Binary>>& binary() {
  static const auto op = find_op<Binary>("mkldnn::_linear_pointwise", "binary");
  return op;
}

bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool cpu_f32(const at::Tensor& t) { return !t.defined() || (t.device().is_cpu() && t.scalar_type() == at::kFloat); }

// oneDNN's post-op for each activation: (attr, algorithm).
std::pair<const char*, std::optional<c10::string_view>> post_op(Activation act) {
  switch (act) {
    case Activation::relu: return {"relu", std::nullopt};
    case Activation::gelu: return {"gelu", "none"};
    case Activation::gelu_tanh: return {"gelu", "tanh"};
    case Activation::silu: return {"swish", std::nullopt};
    case Activation::none: break;
  }
  return {"none", std::nullopt};
}

std::optional<at::Tensor> maybe(const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; }

at::Tensor onednn(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, Activation act) {
  const auto [attr, algorithm] = post_op(act);
  return (*unary()).call(x, w, maybe(b), attr, c10::List<std::optional<c10::Scalar>>(), algorithm);
}

// x Wᵀ + b for a frozen W and b (a base weight under PEFT) and an x that needs its gradient:
// the product on oneDNN, and ∂x = g W (itself a dense_linear with Wᵀ) in the backward.
// W and b get no gradient, so nothing else is saved.
struct FrozenProduct : torch::autograd::Function<FrozenProduct> {
  // x (..., in), w (out, in), b (out) or (0) for none (autograd's records need a defined
  // tensor in every slot) -> (..., out)
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    ctx->save_for_backward({w});
    return onednn(x, w, b.numel() > 0 ? b : at::Tensor(), Activation::none);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const at::Tensor w = ctx->get_saved_variables()[0];         // (out, in)
    return {dense_linear(g[0], w.t()), at::Tensor(), at::Tensor()};  // (..., in)
  }
};

// The product through a weight kept in another form (a quantized base): dequantized for the
// forward and again for the input's gradient, never saved for backward — autograd would
// otherwise hold every layer's dense weight until backward, the memory the storage saves.
// The stored weight outlives the step (the model owns it).
struct RecomputedProduct : torch::autograd::Function<RecomputedProduct> {
  // Slab by slab (blockwise_product.cpp) where the weight has blocks of rows and t is CPU f32.
  static bool blockwise(const at::Tensor& t, const StoredTensor& w) {
    return w.column_step() > 0 && t.is_cpu() && t.scalar_type() == at::kFloat && t.dim() >= 1;
  }
  // x (..., in), b (out) or (0) for none -> (..., out)
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& b, std::int64_t stored) {
    ctx->saved_data["stored"] = stored;
    ctx->saved_data["bias"] = b.numel() > 0;
    ctx->saved_data["in"] = x.size(-1);
    const auto* w = reinterpret_cast<const StoredTensor*>(stored);
    if (!blockwise(x, *w)) return dense_linear(x, w->dense(), b.numel() > 0 ? b : at::Tensor());
    at::Tensor y = blockwise_forward(x, *w);  // (..., out)
    return b.numel() > 0 ? y.add_(b) : y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto* w = reinterpret_cast<const StoredTensor*>(ctx->saved_data["stored"].toInt());
    at::Tensor gx, gb;
    if (ctx->needs_input_grad(0))
      gx = blockwise(g[0], *w) ? blockwise_input_grad(g[0], *w, ctx->saved_data["in"].toInt()) : dense_linear(g[0], w->dense().t());  // (..., in)
    if (ctx->needs_input_grad(1) && ctx->saved_data["bias"].toBool()) gb = g[0].reshape({-1, g[0].size(-1)}).sum(0);
    return {gx, gb, at::Tensor()};
  }
};

}  // namespace

at::Tensor recomputed_linear(const at::Tensor& x, const StoredTensor& w, const at::Tensor& b) {
  return RecomputedProduct::apply(x, b.defined() ? b : at::empty({0}, x.options()), reinterpret_cast<std::int64_t>(&w));
}

at::Tensor activate(Activation act, const at::Tensor& y, const at::Tensor& times) {
  at::Tensor a = y;
  switch (act) {
    case Activation::relu: a = at::relu(y); break;
    case Activation::gelu: a = at::gelu(y); break;
    case Activation::gelu_tanh: a = at::gelu(y, "tanh"); break;
    case Activation::silu: a = at::silu(y); break;
    case Activation::none: break;
  }
  return times.defined() ? a * times : a;
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, Activation act, const at::Tensor& times) {
  const bool oneDNN = cpu_f32(x) && cpu_f32(w) && cpu_f32(b) && cpu_f32(times) && x.dim() >= 2 && x.numel() > 0 &&
                      w.numel() > 0 && at::globalContext().userEnabledMkldnn() && unary();
  const bool grad = at::GradMode::is_enabled() && (wants_grad(x) || wants_grad(w) || wants_grad(b) || wants_grad(times));
  if (oneDNN && grad && !wants_grad(w) && !wants_grad(b)) {
    // Training through a frozen weight: the product on oneDNN with a backward of its own;
    // the activation and `times` stay separate, as autograd needs the values before them.
    return activate(act, FrozenProduct::apply(x, w, b.defined() ? b : at::empty({0}, w.options())), times);
  }
  if (!oneDNN || grad) {  // a gradient for W or b: at::linear records it
    return activate(act, at::linear(x, w, b), times);
  }
  // The binary op takes `times` only in the output's own shape, and no activation with it.
  if (times.defined() && act == Activation::none && binary() && x.dim() == times.dim() &&
      x.sizes().slice(0, x.dim() - 1) == times.sizes().slice(0, times.dim() - 1) && times.size(-1) == w.size(0))
    return (*binary()).call(x, times.contiguous(), w, maybe(b), "mul");
  at::Tensor y = onednn(x, w, b, act);
  if (!times.defined()) return y;
  return times.sizes() == y.sizes() ? y.mul_(times) : y * times;
}

}  // namespace tessera

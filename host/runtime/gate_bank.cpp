#include "runtime/gate_bank.h"

#include <tessera/sample_mean.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace tessera {

std::int64_t GateBank::add(const std::string& input, at::Tensor weight, at::Tensor bias) {
  Input& in = inputs_[input];
  in.weights.push_back(std::move(weight));
  in.biases.push_back(std::move(bias));
  in.x_impl = nullptr;  // a new column: computed again
  return static_cast<std::int64_t>(in.weights.size()) - 1;
}

at::Tensor GateBank::gate(const std::string& input, std::int64_t column, const at::Tensor& x) const {
  const Input& in = inputs_.at(input);
  const bool grad = at::GradMode::is_enabled();
  std::int64_t versions = static_cast<std::int64_t>(x._version());
  for (const auto& w : in.weights) versions += static_cast<std::int64_t>(w._version());
  for (const auto& b : in.biases) versions += static_cast<std::int64_t>(b._version());
  const bool same = in.x_impl == x.unsafeGetTensorImpl() && !in.x.expired() && in.grad == grad && in.versions == versions && in.gates.defined();
  if (!same) {
    const auto dtype = x.scalar_type();
    const at::Tensor w = in.weights.size() == 1 ? in.weights[0] : at::cat(in.weights, 0);  // (K, F)
    const at::Tensor b = in.biases.size() == 1 ? in.biases[0] : at::cat(in.biases, 0);     // (K)
    in.gates = mean_over_tokens_per_row(model_, at::sigmoid(at::linear(x, w.to(dtype), b.to(dtype))));
    in.x = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(x.getIntrusivePtr());
    in.x_impl = x.unsafeGetTensorImpl();
    in.grad = grad;
    in.versions = versions;
  }
  return in.gates.narrow(-1, column, 1);
}

}  // namespace tessera

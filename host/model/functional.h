// Stateless pieces the architectures share, as transformers computes them. Include after
// ATen (this header is for the model .cpp files only).
#pragma once

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

namespace tessera {

// RMS normalization (Zhang & Sennrich 2019), LLaMA's and T5's: the mean square in f32, the
// normalized value back in the input dtype, then the weight.
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor xf = x.to(at::kFloat);
  xf = xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps);
  return weight * xf.to(x.scalar_type());
}

inline bool known_activation(const std::string& act) {
  return act == "silu" || act == "swish" || act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu" || act == "relu";
}

// Activations by their transformers names (gelu_new is the tanh approximation).
inline at::Tensor activate(const std::string& act, const at::Tensor& x) {
  if (act == "silu" || act == "swish") return at::silu(x);
  if (act == "gelu_new" || act == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  if (act == "gelu") return at::gelu(x);
  if (act == "relu") return at::relu(x);
  throw std::runtime_error("activation '" + act + "' is not supported");
}

}  // namespace tessera

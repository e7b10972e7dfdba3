// Stateless pieces the architectures share, as transformers computes them. Include after
// ATen (this header is for the model .cpp files only).
#pragma once

#include <tessera/sites.h>

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
inline Activation activation_of(const std::string& act) {
  if (act == "silu" || act == "swish") return Activation::silu;
  if (act == "gelu_new" || act == "gelu_pytorch_tanh") return Activation::gelu_tanh;
  if (act == "gelu") return Activation::gelu;
  if (act == "relu") return Activation::relu;
  throw std::runtime_error("activation '" + act + "' is not supported");
}

// A feed-forward block's hidden units: act(up(x)), or act(gate(x)) ∘ up(x) when gated
// (GLU variants, Shazeer 2020) — each activation and product inside a GEMM's epilogue
// where the kernel allows (see tessera/dense_linear.h).
inline at::Tensor ffn_hidden(const LinearSiteImpl* gate, const LinearSiteImpl& up, const std::string& act, const at::Tensor& x) {
  if (!gate) return up.forward(x, activation_of(act));
  return up.forward(x, Activation::none, gate->forward(x, activation_of(act)));
}

}  // namespace tessera

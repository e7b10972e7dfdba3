// y = act(x Wᵀ + b) ∘ times, the one dense product every linear site and head runs.
//
// On the CPU in float32, when W and b need no gradient (inference, or a frozen base weight
// under PEFT), it runs oneDNN's inner product (libtorch's `mkldnn::_linear_pointwise`)
// instead of `at::linear`'s MKL sgemm: the same product, ~10–25% faster at the shapes
// transformers have, reading transposed and row-sliced weight views in place. With no
// gradient to record at all, the bias, the activation or the product with `times` run in
// the kernel's epilogue instead of as separate passes over the output; when x needs its
// gradient, the product has a backward of its own (∂x = g W, on oneDNN too) and the
// activation and product stay separate autograd steps. Everywhere else — W or b trained,
// CUDA, half precision, a libtorch built without oneDNN — it is `at::linear`, then the
// activation, then the product.
#pragma once

#include <ATen/core/Tensor.h>

namespace tessera {

// The activations feed-forward blocks use. gelu: erf form; gelu_tanh: the tanh
// approximation (transformers' gelu_new, gelu_pytorch_tanh); silu: x·σ(x) (swish).
enum class Activation { none, relu, gelu, gelu_tanh, silu };

// act(y) ∘ times (times undefined: act(y)) as separate passes, the unfused epilogue.
at::Tensor activate(Activation act, const at::Tensor& y, const at::Tensor& times = {});

// x: (..., in), w: (out, in), b: (out) or undefined, times: (..., out) or undefined
//   -> (..., out)
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b = {}, Activation act = Activation::none,
                        const at::Tensor& times = {});

}  // namespace tessera

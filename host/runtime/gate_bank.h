// The gates of a run's gated groups at linear sites, computed together: every gate at the
// linear sites that read one input tensor (an attention's q, k and v, each member's gate at
// each of them) is one column of one product and one per-sample mean per forward pass,
//   G = mean_t σ(x [w_1; …; w_K]ᵀ + [b_1 … b_K])   (…, K),
// instead of K products, sigmoids and means of one column each. Each of those small steps is a
// parallel region of its own on the CPU: their number, not their arithmetic, was most of what a
// gated group cost (perf: the OpenMP barriers, MKL's gemv and ger).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <map>
#include <string>
#include <vector>

namespace tessera {

class ModelView;

class GateBank {
 public:
  explicit GateBank(const ModelView& model) : model_(model) {}
  // One gate, weight (1, F) and bias (1), of the sites whose input is `input` (a linear site's
  // input group); its column in that input's gates.
  std::int64_t add(const std::string& input, at::Tensor weight, at::Tensor bias);
  // Gate `column` of `input`'s gates for x (B, T, F) or (N, F), the real tokens' rows:
  // (B, 1, 1) or (N, 1). Computed once per x: later calls with the same tensor, unchanged, and
  // the same gate tensors, unchanged, read it back. Not thread-safe: one forward pass at a time,
  // as the forward context it reads.
  at::Tensor gate(const std::string& input, std::int64_t column, const at::Tensor& x) const;

 private:
  struct Input {
    std::vector<at::Tensor> weights, biases;  // the gates' own tensors, (1, F) and (1) each
    // The last x these gates were computed for, held weakly: alive and the same object means
    // the same forward pass's input (a freed tensor's address may come back for another).
    mutable c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> x{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    mutable const c10::TensorImpl* x_impl = nullptr;
    mutable bool grad = false;
    mutable std::int64_t versions = -1;  // x's and the gates' tensors' version counters, summed: an in-place change recomputes
    mutable at::Tensor gates;  // (B, 1, K) or (N, K)
  };
  const ModelView& model_;
  std::map<std::string, Input> inputs_;
};

}  // namespace tessera

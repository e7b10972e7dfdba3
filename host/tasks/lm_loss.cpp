#include "tasks/lm_loss.h"

#include <ATen/ATen.h>

namespace tessera {

at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels) {
  const auto T = logits.size(1), V = logits.size(2);
  at::Tensor predicted = logits.narrow(1, 0, T - 1).reshape({-1, V}).to(at::kFloat);  // (B (T-1), V)
  at::Tensor next = labels.narrow(1, 1, T - 1).reshape({-1});                          // (B (T-1))
  return at::cross_entropy_loss(predicted, next, {}, at::Reduction::Mean, /*ignore_index=*/-100);
}

}  // namespace tessera

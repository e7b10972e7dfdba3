// AdaMix's consistency regulariser, shared by its adapter form (adamix) and its LoRA form
// (adamix_lora): the step's own pass and the task's forward pass once more on the same batch
// (a fresh routing, fresh dropout), and the symmetric KL between their softmaxes, each
// direction against the other pass held fixed — as the authors' code computes it:
//
//   w · ½ [KL(sg p₁ ‖ p₂) + KL(sg p₂ ‖ p₁)],   p = softmax(z),   KL averaged over the rows
//
// Per-token logits (B, T, L) are compared per token, as rows of (B·T, L).
#pragma once

#include <tessera/extensions.h>

#include <ATen/ATen.h>

#include <stdexcept>

namespace tessera::adamix {

// ½ [KL(sg p_a ‖ p_b) + KL(sg p_b ‖ p_a)] over the rows, KL(p ‖ q) = Σ p (log p − log q)
// averaged over the rows (PyTorch's "batchmean").
inline at::Tensor symmetric_kl(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor la = at::log_softmax(a.flatten(0, a.dim() - 2).to(at::kFloat), -1), lb = at::log_softmax(b.flatten(0, b.dim() - 2).to(at::kFloat), -1);
  const auto rows = static_cast<double>(la.size(0));
  auto kl = [rows](const at::Tensor& target_log, const at::Tensor& log_q) { return (target_log.exp() * (target_log - log_q)).sum() / rows; };
  return 0.5 * (kl(la.detach(), lb) + kl(lb.detach(), la));
}

// w times the term, through the host's tessera.host.training version 2 (null: refused, naming
// the key that turns it off). A task without logits is refused before its second pass.
inline at::Tensor consistency(const tessera_host_training_v2* training, double weight) {
  if (training == nullptr)
    throw std::runtime_error("AdaMix's consistency loss needs the host's tessera.host.training version 2 (the step's pass and a second one); set consistency_weight = 0");
  at::Tensor loss, a, b;
  training->step_output(training->host, &loss, &a);
  if (!a.defined())  // before the second pass, which would be wasted
    throw std::runtime_error("AdaMix's consistency loss compares a classifier's predicted distributions, and this task has no logits: set consistency_weight = 0");
  training->forward_again(training->host, &loss, &b);
  return symmetric_kl(a, b) * weight;
}

}  // namespace tessera::adamix

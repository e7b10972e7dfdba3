// Cross-entropy of a language-model head without its logits: the head's matrix product
// and the softmax run over chunks of tokens, so a batch never holds (tokens × vocabulary)
// logits — 206 MB for GPT-2 at 8 × 128 tokens, 8 GB for a 128 k vocabulary at 8 × 2048 —
// but at most one chunk of them (~32 MB). With autograd on, each chunk's gradient
//   ∂L/∂h = (softmax(hW^T + b) − onehot(t)) W,  ∂L/∂W = (…)^T h,  ∂L/∂b = Σ (…)
// is formed while the chunk's logits are at hand and kept for backward: (tokens × H)
// instead of (tokens × V). The chunked path runs when the head site has no
// interventions (its weight and bias may still carry parameter deltas); otherwise the
// head's own forward runs whole.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tessera {

class LinearSiteImpl;

// hidden (N, H) rows that each predict one token; targets (N) int64, all real (callers
// drop ignored positions first, which also saves their share of the head's work).
// Returns Σ −log softmax(head(hidden))[target] as a scalar (f32, or f64 for an f64 head),
// differentiable.
at::Tensor head_loss_sum(LinearSiteImpl& head, const at::Tensor& hidden, const at::Tensor& targets);

struct HeadStats {
  double loss_sum = 0;
  std::int64_t correct = 0;  // rows whose most likely token is the target
};
// The same sum and the argmax hits, without autograd (evaluation).
HeadStats head_stats(LinearSiteImpl& head, const at::Tensor& hidden, const at::Tensor& targets);

// Rows of `hidden` (…, H) and `targets` (…) where the target is not -100, flattened:
// (N, H), (N).
std::pair<at::Tensor, at::Tensor> labelled_rows(const at::Tensor& hidden, const at::Tensor& targets);

}  // namespace tessera

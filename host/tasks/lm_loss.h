// Next-token cross-entropy, as causal language models are trained: position t predicts
// token t + 1; labels of -100 (padding, prompt tokens) are left out of the mean.
#pragma once

#include <ATen/core/Tensor.h>

namespace tessera {

// logits (B, T, V), labels (B, T) int64 -> scalar f32
at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels);

}  // namespace tessera

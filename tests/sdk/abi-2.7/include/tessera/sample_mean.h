// The mean of per-token values over each sample's real tokens, in whichever layout the host
// runs the forward pass: what a gate averaged over the sequence needs (UniPELT's σ(W_g x), a
// gated composition group, AdapterHub's use_gating).
//
// Pad positions never count, so a sample's mean — and its output — is the same in any batch,
// padded to any length, and a gate does not force the host off its unpadded layout (where the
// rows are the real tokens only). AdapterHub averages over every position, pads included:
// equal on a batch without padding, and on each sample run alone. Two exceptions, where the
// host's mask does not describe what a closure reads: T5's decoder, whose mask is all ones (its
// target padding counts), and T5's cross-attention keys and values (the encoder's states:
// every position counts). A token-wise closure (SDK 2.1) may use it: it reads which sample
// each row belongs to, so the host keeps dropping padding. Sums run in float32 at least (a bf16
// sum of hundreds of gates would stop growing), the result comes back in s's dtype.
//
// Header-only on the SDK 2.1 ModelView facts (attention_mask, token_samples): no ABI symbol.
#pragma once

#include <tessera/model_view.h>

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>

#include <stdexcept>

namespace tessera {

// s: per-token values of one forward pass, (B, T, k) padded or (N, k) the real tokens' rows
// while the host runs unpadded -> (B, k), each sample's mean over its real tokens.
// Padded: the positions model.attention_mask() marks real where its shape is (B, T); every
// position where it is not that batch's (T5's cross-attention reads the encoder's states; a
// cached generation step sees only its new tokens).
inline at::Tensor mean_over_tokens(const ModelView& model, const at::Tensor& s) {
  const at::Tensor rows = model.token_samples();  // (N) int64, the sample of each row
  const at::Tensor mask = model.attention_mask();  // (B, S) int64, 1 = real
  const bool half = s.scalar_type() == at::kBFloat16 || s.scalar_type() == at::kHalf;
  const at::Tensor s32 = half ? s.to(at::kFloat) : s;  // sums at least in float32
  if (s.dim() == 2 && rows.defined() && rows.size(0) == s.size(0)) {  // the rows are the mask's real tokens
    const at::Tensor sums = at::zeros({mask.size(0), s.size(1)}, s32.options()).index_add(0, rows, s32);  // (B, k)
    return (sums / mask.sum(1, true).clamp_min(1).to(s32.scalar_type())).to(s.scalar_type());
  }
  if (s.dim() != 3) throw std::invalid_argument("mean_over_tokens: values shaped " + c10::str(s.sizes()) + " are neither (B, T, k) nor one row per real token");
  if (!mask.defined() || mask.dim() != 2 || mask.size(0) != s.size(0) || mask.size(1) != s.size(1)) return s32.mean(1).to(s.scalar_type());
  const at::Tensor m = mask.to(s32.scalar_type()).unsqueeze(-1);  // (B, T, 1)
  return ((s32 * m).sum(1) / m.sum(1).clamp_min(1)).to(s.scalar_type());
}

// Each sample's mean, as mean_over_tokens gives it, broadcast back to s's rows:
// (B, 1, k) for a padded s, (N, k) for the real tokens' rows.
inline at::Tensor mean_over_tokens_per_row(const ModelView& model, const at::Tensor& s) {
  const at::Tensor means = mean_over_tokens(model, s);  // (B, k)
  return s.dim() == 2 ? means.index_select(0, model.token_samples()) : means.unsqueeze(1);
}

}  // namespace tessera

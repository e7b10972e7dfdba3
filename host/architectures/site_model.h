// What every architecture shares: it owns its sites (ModelViewImpl's helpers create them
// while it loads) and hands them out to methods as a ModelView.
#pragma once

#include <tessera/internal/sites_impl.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

// An encoder's output: hidden states over [prompt tokens ; input tokens].
struct Encoded {
  Tensor hidden;                   // (B, P + T, H)
  Tensor mask;                     // (B, P + T), 1 = real token (prompt tokens are real)
  std::int64_t prompt_length = 0;  // P
};

// Padding tokens dropped: token-wise work (linear sites, norms, activations, dropout)
// runs on the N real tokens' rows; attention runs on the padded layout rebuilt from
// `index`, the flat positions of those tokens in (B, S).
struct Unpadded {
  Tensor index;  // (N) int64 into B * S
  std::int64_t batch = 0, seq = 0;
  static Unpadded of(const Tensor& mask);  // mask (B, S), 1 = real token
  Tensor rows(const Tensor& x) const;      // (B, S, …) -> (N, …)
  Tensor padded(const Tensor& x) const;    // (N, …) -> (B, S, …), zeros at padding
};

// A checkpoint tensor as the model holds it: the parameter site with its value (a tied
// copy's entry names its original's site), transposed where the file stores (in, out) —
// GPT-2's Conv1D.
struct CheckpointTensor {
  const ParameterSiteImpl* site = nullptr;
  bool transposed = false;
};

class SiteModel : public ModelViewImpl {
 public:
  SiteModel();  // offers the host's extensions (tessera.host.log)
  // Every method on the model is token-wise (no layer-site intervention, sublayer ones
  // only declared token-wise), so padding tokens can be dropped (see Unpadded).
  bool token_wise_only() const;
  // The forward context closures read: the mask of the layout they see (B, S), and with
  // padding dropped each row's sample.
  void enter_forward(const Tensor& mask, const Unpadded* u) const;
  // [train] gradient_checkpointing: while training, the layers keep only their inputs for
  // backward and run again there (architectures/recompute.h).
  void set_gradient_checkpointing(bool on) { checkpointing_ = on; }
  bool gradient_checkpointing() const { return checkpointing_; }
  // Tensors in the checkpoint the architecture does not use (pooler, task heads, buffers).
  const std::vector<std::string>& ignored_tensors() const { return ignored_; }
  // Linear sites whose weights a quantized load keeps dense (targets' syntax), as
  // transformers' _keep_in_fp32_modules: T5's feed-forward output (wo).
  const std::vector<std::string>& keep_dense() const { return keep_dense_; }
  // Frees the dequantized copies plugins asked for of quantized bases (ParameterSite::base()).
  void drop_dense_copies();
  // The checkpoint's tensors that parameter sites hold, by the name each was read under
  // (which an old checkpoint's LayerNorm gamma/beta makes differ from the site's hf_name):
  // what `tessera export` writes back. Those no site holds (pooler, buffers, other heads) are not here.
  const std::map<std::string, CheckpointTensor>& checkpoint_tensors() const { return checkpoint_tensors_; }

 protected:
  // Records that checkpoint tensor `name` is held by `site`; returns `site`.
  ParameterSiteImpl* held_by(const std::string& name, ParameterSiteImpl* site, bool transposed = false) {
    checkpoint_tensors_[name] = {site, transposed};
    return site;
  }
  std::vector<std::string> keep_dense_;
  // Fills info(): the shape numbers, and activations in `options` with trainable tensors in f32.
  void describe(ModelInfo shape, c10::TensorOptions options);
  std::vector<std::string> ignored_;

 private:
  std::map<std::string, CheckpointTensor> checkpoint_tensors_;
  bool checkpointing_ = false;
};

}  // namespace tessera

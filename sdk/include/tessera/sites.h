// Sites: the named places in a base model where methods install interventions.
//
// A method never edits the base model. Each building block of every architecture is a
// site with a canonical name (`layers.3.attn.q`) and the Hugging Face module path it
// came from (`encoder.layer.3.attention.self.query`). Interventions are data: closures
// owned by a method instance (`owner`), removed together by `remove(owner)`.
//
// Fixed execution order, so that methods that never heard of each other compose:
//
//   ParameterSite   value  = base + Σ δ_k                         (δ may be masked)
//   LinearSite      y      = (W + Σ ΔW_k)(x ∘ Π s_in) + b          W, b: parameter values
//                   y      = y ∘ Π s_out
//                   y      = y + Σ branch_k(x)                     x: the site's raw input
//   SublayerSite    h      = F(x)                                  the block's own output
//                   h      = seq_n(… seq_1(h))                     in install order
//                   h      = h + Σ parallel_k(x)
//                   h      = h ∘ Π gate_k(x)                       then residual + norm
//   AttentionSite   K, V   = [prefix_K ; K], [prefix_V ; V]        mask extended with ones
//                   scores = hook_n(… hook_1(QKᵀ/√d + mask))       before the softmax
//   EmbeddingSite   e      = [prompt_1 ; … ; prompt_n ; embed(ids)] mask extended with ones,
//                                                                   token labels with -100
//   LayerSite       keep   = Π router_k(h)  (B, T) in {0,1}        tokens with 0 skip the layer
//                   h'     = keep ∘ layer(h) + (1 − keep) ∘ h
//                   tap_k(h') for every tap                        read-only
//
// Shapes: sublayer and layer interventions always see (B, T, H). Linear-site
// interventions must be token-wise: they see (..., in), which may be (N, in) when the
// host drops padding tokens (it does so only while no sublayer or layer site has an
// intervention).
//
// Thread-safety: sites are configured before training and read during forward; they
// are not safe to modify concurrently with a forward pass.
#pragma once

#include <tessera/dense_linear.h>

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace tessera {

using Tensor = at::Tensor;
using TensorThunk = std::function<Tensor()>;               // computes a tensor from method state
using TensorMap = std::function<Tensor(const Tensor&)>;   // x ↦ f(x)
using PerBatch = std::function<Tensor(std::int64_t)>;     // batch size ↦ tensor
using KVPrefix = std::function<std::pair<Tensor, Tensor>(std::int64_t)>;
using HiddenTap = std::function<void(const Tensor&)>;

template <class Fn>
struct Intervention {
  std::string owner;  // the method instance that installed it
  Fn fn;
};

template <class Fn>
using Interventions = std::vector<Intervention<Fn>>;

// Every base tensor, by name. The base tensor is frozen and never written during
// training; a method adds a delta δ (masked or not) that the forward pass sees.
class ParameterSite {
 public:
  ParameterSite(std::string name, std::string hf_name, Tensor base);

  const std::string& name() const { return name_; }        // "layers.0.attn.q.weight"
  const std::string& hf_name() const { return hf_name_; }  // "encoder.layer.0....weight"
  const Tensor& base() const { return base_; }              // frozen
  Tensor value() const;                                      // base + Σ δ

  void add_delta(std::string owner, TensorThunk delta);
  // Merging is an explicit step, never part of training: base += d, without autograd.
  void fold(const Tensor& d);
  void remove(const std::string& owner);
  bool has_deltas() const { return !deltas_.empty(); }

 private:
  std::string name_, hf_name_;
  Tensor base_;
  Interventions<TensorThunk> deltas_;
};

class LinearSite {
 public:
  LinearSite(std::string name, std::string hf_path, ParameterSite* weight, ParameterSite* bias);

  const std::string& name() const { return name_; }        // "layers.3.attn.q"
  const std::string& hf_path() const { return hf_path_; }  // "encoder.layer.3.attention.self.query"
  std::int64_t in_features() const;
  std::int64_t out_features() const;
  ParameterSite& weight() { return *weight_; }             // (out, in)
  ParameterSite* bias() { return bias_; }                  // (out) or null

  void add_weight_delta(std::string owner, TensorThunk delta_w);  // () -> (out, in)
  void add_input_scale(std::string owner, TensorThunk s_in);      // () -> (in)
  void add_output_scale(std::string owner, TensorThunk s_out);    // () -> (out)
  void add_branch(std::string owner, TensorMap branch);           // (..., in) -> (..., out)
  void remove(const std::string& owner);

  Tensor forward(const Tensor& x) const;  // (..., in) -> (..., out), in the order above
  // act(forward(x)) ∘ times (times: (..., out) or undefined), the activation and the
  // product inside the GEMM's epilogue when no output scale or branch comes between.
  Tensor forward(const Tensor& x, Activation act, const Tensor& times = {}) const;
  // Any intervention on the site itself (parameter deltas live on weight() and bias()).
  bool has_interventions() const {
    return !weight_deltas_.empty() || !input_scales_.empty() || !output_scales_.empty() || !branches_.empty();
  }

 private:
  std::string name_, hf_path_;
  ParameterSite* weight_;  // not owned: the model owns its parameter sites
  ParameterSite* bias_;
  Interventions<TensorThunk> weight_deltas_, input_scales_, output_scales_;
  Interventions<TensorMap> branches_;
};

// A whole sub-layer (attention or MLP block) up to, not including, its residual add.
class SublayerSite {
 public:
  SublayerSite(std::string name, std::string hf_path, std::int64_t hidden_size);

  const std::string& name() const { return name_; }  // "layers.3.attn", "layers.3.mlp"
  const std::string& hf_path() const { return hf_path_; }
  std::int64_t hidden_size() const { return hidden_size_; }

  void add_sequential(std::string owner, TensorMap module);  // h (B,T,H) -> (B,T,H)
  void add_parallel(std::string owner, TensorMap module);    // x (B,T,H) -> (B,T,H)
  void add_gate(std::string owner, TensorMap gate);          // x (B,T,H) -> broadcastable to h
  void remove(const std::string& owner);

  Tensor apply(const Tensor& x, Tensor h) const;  // x: block input, h: block output
  bool empty() const { return sequential_.empty() && parallel_.empty() && gates_.empty(); }

 private:
  std::string name_, hf_path_;
  std::int64_t hidden_size_;
  Interventions<TensorMap> sequential_, parallel_, gates_;
};

class AttentionSite {
 public:
  AttentionSite(std::string name, std::string hf_path, std::int64_t num_heads, std::int64_t head_dim);

  const std::string& name() const { return name_; }  // "layers.3.attn"
  const std::string& hf_path() const { return hf_path_; }
  std::int64_t num_heads() const { return num_heads_; }
  std::int64_t head_dim() const { return head_dim_; }

  // batch ↦ (K, V), each (B, heads, P, head_dim)
  void add_prefix(std::string owner, KVPrefix prefix);
  // scores (B, heads, T, S) ↦ scores, before the softmax
  void add_score_hook(std::string owner, TensorMap hook);
  void remove(const std::string& owner);

  bool has_prefix() const { return !prefixes_.empty(); }
  bool has_score_hooks() const { return !score_hooks_.empty(); }
  // Concatenated prefixes for a batch: (B, heads, P, head_dim) each; undefined when none.
  std::pair<Tensor, Tensor> prefix(std::int64_t batch) const;
  Tensor hook_scores(Tensor scores) const;

 private:
  std::string name_, hf_path_;
  std::int64_t num_heads_, head_dim_;
  Interventions<KVPrefix> prefixes_;
  Interventions<TensorMap> score_hooks_;
};

class EmbeddingSite {
 public:
  EmbeddingSite(std::string name, std::string hf_path, std::int64_t hidden_size);

  const std::string& name() const { return name_; }  // "embed"
  const std::string& hf_path() const { return hf_path_; }
  std::int64_t hidden_size() const { return hidden_size_; }

  void add_prompt(std::string owner, PerBatch prompt);  // batch ↦ (B, P, H)
  void remove(const std::string& owner);
  bool has_prompts() const { return !prompts_.empty(); }

  // (B, T, H) -> (B, P + T, H); P is returned through prompt_length.
  Tensor prepend(const Tensor& embedded, std::int64_t* prompt_length) const;

 private:
  std::string name_, hf_path_;
  std::int64_t hidden_size_;
  Interventions<PerBatch> prompts_;
};

class LayerSite {
 public:
  LayerSite(std::string name, std::string hf_path, std::int64_t index);

  const std::string& name() const { return name_; }  // "layers.3"
  const std::string& hf_path() const { return hf_path_; }
  std::int64_t index() const { return index_; }

  void add_tap(std::string owner, HiddenTap tap);         // sees (B, T, H) after the layer
  void add_router(std::string owner, TensorMap router);  // h (B,T,H) -> keep (B,T) in {0,1}
  void remove(const std::string& owner);

  // Runs `layer` on h under the routers, then the taps.
  Tensor run(const Tensor& h, const std::function<Tensor(const Tensor&)>& layer) const;
  bool empty() const { return taps_.empty() && routers_.empty(); }

 private:
  std::string name_, hf_path_;
  std::int64_t index_;
  Interventions<HiddenTap> taps_;
  Interventions<TensorMap> routers_;
};

}  // namespace tessera

// Sites: the named places in a base model where methods install interventions.
//
// A method never edits the base model. Each building block of every architecture is a
// site with a canonical name (`layers.3.attn.q`) and the Hugging Face module path it
// came from (`encoder.layer.3.attention.self.query`). Interventions are data: closures
// owned by a method instance (an Owner, see owner.h), removed together by remove(owner).
//
// Fixed execution order, so that methods that never heard of each other compose
// (α_k: the scale the host gives intervention k's owner, 1 unless it says otherwise):
//
//   ParameterSite   value  = base + Σ α_k δ_k                      (δ may be masked)
//                   value  = value + Σ α_k scatter(idx_k, v_k)     sparse deltas (2.4)
//   LinearSite      W'     = T_n(… T_1(W + Σ α_k ΔW_k))            W, b: parameter values
//                   y      = W'(x ∘ Π s_in,k) + b                  (no transform: W' = W + Σ α ΔW)
//                   y      = y ∘ Π s_out,k
//                   y      = y + Σ α_k branch_k(x)                 x: the site's raw input
//   SublayerSite    h      = F(x)                                  the block's own output
//                   h      = seq_n(… seq_1(h))                     in install order; a residual
//                                                                   module is seq_k(h, r, N) (2.3)
//                   h      = h + Σ α_k parallel_k(x)
//                   h      = h ∘ Π gate_k(x)                       then N(r + h): residual + norm
//                                                                   r: the residual stream the block
//                                                                   adds h to; N: BERT's post-norm,
//                                                                   the identity in pre-norm blocks
//   AttentionSite   K, V   = [prefix_K ; in_K(x) ; K], […V]        mask extended with ones;
//                                                                   x: what the query projection reads
//                   scores = hook_n(… hook_1(QKᵀ/√d + mask))       before the softmax
//   EmbeddingSite   e      = [prompt_1 ; … ; prompt_n ; embed(ids)] mask extended with ones,
//                                                                   token labels with -100
//                   x0     = t_n(… t_1(x0))                        transforms (2.7), in install order
//                   tap_k(x0) for every tap                        x0: what layer 0 receives
//                                                                   (after the embedding block's
//                                                                   norm and dropout), read-only
//   LayerSite       in_tap_k(h) for every input tap                read-only (2.7)
//                   keep   = Π router_k(h)  (B, T)                 tokens with 0 skip the layer:
//                   h'     = keep ∘ layer_kept(h) + (1 − keep) ∘ h  the layer runs on the kept
//                                                                   tokens alone (they attend to
//                                                                   kept tokens only; an encoder
//                                                                   gathers them, so 25% kept
//                                                                   costs about a quarter)
//                   h'     = h' + Σ α_k parallel_k(h)              every token (2.3)
//                   tap_k(h') for every tap                        read-only
//   OutputSite      h      = out_n(… out_1(h))                     the backbone's final hidden
//                                                                   states, then the task head
//
// The host's scale α: additive contributions (δ, ΔW, branch, parallel) are multiplied by
// it; multiplicative and sequential ones move from the identity toward their value,
// s ↦ 1 + α(s − 1) for scales and gates, h ↦ h + α(seq(h) − h) for a sequential module,
// scores ↦ scores + α(hook(scores) − scores) for a score hook, and likewise
// W ↦ W + α(T(W) − W) for a weight transform and
// h ↦ h + α(out(h) − h) for an output or embedding transform. Prefixes, prompts, routers
// and taps change a shape or a path, not a magnitude: they follow only `enabled`.
// At α = 1 nothing is multiplied, so the numbers are those of the method alone. A
// disabled owner's interventions are skipped as if absent. Composition groups (the host's
// [[groups]], docs/composing.md) add to α per-sample or per-token factors (a route mask,
// a gate) under the same rule, and let owners of one parallel group read the same input
// where interventions chain (sequential modules, transforms) so that their changes add.
//
// Shapes: sublayer (but token-wise ones), layer, embedding-tap and output interventions
// always see (B, T, H) (with a KV cache in generation, T is the tokens of this forward
// call only). Linear-site interventions must be token-wise: they see (..., in), which may
// be (N, in) when the host drops padding tokens — it does so while every intervention is
// token-wise: none on a layer site, none on a sublayer site but token-wise modules, no
// input prefix.
//
// Errors: whatever a closure throws reaches the host as a std::runtime_error reading
// "plugin 'x' (instance 'y') at site 'layers.3.attn.q': <what it threw>".
//
// Handles: a method holds pointers to sites for as long as it is attached and calls the
// functions below, which live in libtessera_sdk; the classes carry no data a plugin
// could depend on, so a minor version adds intervention kinds (new functions) without
// breaking plugins built before. How the host executes a site is not part of the SDK.
//
// Thread-safety: sites are configured before training and read during forward; they
// are not safe to modify concurrently with a forward pass.
#pragma once

#include <tessera/abi.h>
#include <tessera/owner.h>

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>

namespace tessera {

using Tensor = at::Tensor;
using TensorThunk = std::function<Tensor()>;               // computes a tensor from method state
using TensorMap = std::function<Tensor(const Tensor&)>;   // x ↦ f(x)
using PerBatch = std::function<Tensor(std::int64_t)>;     // batch size ↦ tensor
using KVPrefix = std::function<std::pair<Tensor, Tensor>(std::int64_t)>;
using HiddenTap = std::function<void(const Tensor&)>;
#if TESSERA_TARGET_ABI_MINOR >= 1
using KVFromInput = std::function<std::pair<Tensor, Tensor>(const Tensor&)>;  // since SDK 2.1
#endif
#if TESSERA_TARGET_ABI_MINOR >= 3
// (h, r, N) ↦ h': a sublayer module that sees the residual and the block's norm; since SDK 2.3
using ResidualModule = std::function<Tensor(const Tensor& h, const Tensor& residual, const TensorMap& norm)>;
#endif

// What every site handle shares: not copyable, created and destroyed only by the SDK.
class SiteHandle {
 public:
  SiteHandle(const SiteHandle&) = delete;
  SiteHandle& operator=(const SiteHandle&) = delete;

 protected:
  SiteHandle() = default;
  ~SiteHandle() = default;
};

// Every base tensor, by name. The base tensor is frozen and never written during
// training; a method adds a delta δ (masked or not) that the forward pass sees.
class ParameterSite : public SiteHandle {
 public:
  const std::string& name() const;     // "layers.0.attn.q.weight"
  const std::string& hf_name() const;  // "encoder.layer.0.attention.self.query.weight"
  // Frozen. A base kept quantized (storage() != "dense", SDK 2.2) is dequantized on the
  // first call into a copy the host drops after attach, after prepare() and after every
  // training step: read what you need from it then, hold it by value (a reference goes
  // stale when the host drops its copy), and take the compute dtype from
  // ModelView::info().options rather than from base() in a forward closure.
  const Tensor& base() const;
  Tensor value() const;                // base + Σ α δ
#if TESSERA_TARGET_ABI_MINOR >= 2
  // How the host keeps the base: "dense", or "nf4" ([model] quantize = "nf4": 4-bit
  // NormalFloat blocks, QLoRA's storage, dequantized for each product). SDK 2.2.
  const char* storage() const;
#endif

  void add_delta(const Owner& owner, TensorThunk delta);  // () -> base's shape
  // Merging is an explicit step, never part of training: base += d, without autograd.
  void fold(const Tensor& d);
  void remove(const Owner& owner);
  bool has_deltas() const;

#if TESSERA_TARGET_ABI_MINOR >= 4
  // Since SDK 2.4. A sparse delta: the k entries of the flattened base at `indices` ((k)
  // int64, distinct, in range: refused otherwise, naming the tensor) move by values() ((k),
  // the base's dtype); the rest stay the base's. A method that trains 0.5% of a weight holds,
  // differentiates and optimizes those k numbers only (FISH masks, diff pruning's fixed
  // stage). Counted by has_deltas(); applied after the dense deltas.
  void add_sparse_delta(const Owner& owner, Tensor indices, TensorThunk values);
#endif
};

class LinearSite : public SiteHandle {
 public:
  const std::string& name() const;     // "layers.3.attn.q"
  const std::string& hf_path() const;  // "encoder.layer.3.attention.self.query"
  std::int64_t in_features() const;
  std::int64_t out_features() const;
  ParameterSite& weight();  // (out, in)
  ParameterSite* bias();    // (out) or null

  void add_weight_delta(const Owner& owner, TensorThunk delta_w);  // () -> (out, in)
  void add_input_scale(const Owner& owner, TensorThunk s_in);      // () -> (in)
  void add_output_scale(const Owner& owner, TensorThunk s_out);    // () -> (out)
  void add_branch(const Owner& owner, TensorMap branch);           // (..., in) -> (..., out)
  void remove(const Owner& owner);
  // Any intervention on the site itself (parameter deltas live on weight() and bias()).
  bool has_interventions() const;

#if TESSERA_TARGET_ABI_MINOR >= 1
  // Since SDK 2.1. A transform of the summed weight, W + Σ ΔW ↦ T(W + Σ ΔW), (out, in) ->
  // (out, in): DoRA's m · V/‖V‖ sees every method's weight delta (branches are not part of
  // the weight: a method whose update a transform must see installs a weight delta).
  void add_weight_transform(const Owner& owner, TensorMap transform);
#endif

#if TESSERA_TARGET_ABI_MINOR >= 6
  // Since SDK 2.6. Linear sites that read one input tensor in every forward pass — an
  // attention's q, k and v, a gated MLP's gate and up, T5's cross-attention k and v — share
  // this name (their first site's); a site that reads an input of its own has its own name.
  // Branches of such sites can run as one computation: tessera::SharedInput and
  // tessera::low_rank_group.
  const std::string& input_group() const;
#endif
};

// A whole sub-layer (attention or MLP block) up to, not including, its residual add.
class SublayerSite : public SiteHandle {
 public:
  const std::string& name() const;  // "layers.3.attn", "layers.3.mlp"
  const std::string& hf_path() const;
  std::int64_t hidden_size() const;

  void add_sequential(const Owner& owner, TensorMap module);  // h (B,T,H) -> (B,T,H)
  void add_parallel(const Owner& owner, TensorMap module);    // x (B,T,H) -> (B,T,H)
  void add_gate(const Owner& owner, TensorMap gate);          // x (B,T,H) -> broadcastable to h
  void remove(const Owner& owner);
  bool empty() const;

#if TESSERA_TARGET_ABI_MINOR >= 1
  // Since SDK 2.1. As add_sequential / add_parallel, for a module that maps each token's
  // vector on its own (a bottleneck adapter is a per-token MLP): it sees (..., H), which may
  // be (N, H), the real tokens only, and with it installed the host keeps its unpadded fast
  // path. Sequential modules of both kinds run in one install order. A per-sample mean over
  // the tokens through tessera/sample_mean.h (a gate) is allowed: it works on either layout.
  void add_token_wise_sequential(const Owner& owner, TensorMap module);  // h (..., H) -> (..., H)
  void add_token_wise_parallel(const Owner& owner, TensorMap module);    // x (..., H) -> (..., H)
#endif

#if TESSERA_TARGET_ABI_MINOR >= 3
  // Since SDK 2.3. A token-wise sequential module that also sees the residual r — the
  // stream the block adds h to (the block's input; in pre-norm blocks, before their norm)
  // — and the norm N the block applies after that add (BERT/RoBERTa's post-LayerNorm, with
  // its current parameters; the identity in pre-norm blocks: decoders, T5): h ↦ f(h, r, N),
  // each (..., H), in the one install order of the sequential modules; the block then
  // computes N(r + h') as always. AdapterHub's bottleneck placements need both: Pfeiffer's
  // adapter reads N(h + r), a parallel adapter reads r.
  void add_token_wise_residual(const Owner& owner, ResidualModule module);
#endif
};

class AttentionSite : public SiteHandle {
 public:
  const std::string& name() const;  // "layers.3.attn"
  const std::string& hf_path() const;
  std::int64_t num_heads() const;  // key/value heads: a prefix is per key/value head in
                                   // grouped-query models (score hooks see every query head)
  std::int64_t head_dim() const;

  // batch ↦ (K, V), each (B, heads, P, head_dim)
  void add_prefix(const Owner& owner, KVPrefix prefix);
  // scores (B, heads, T, S) ↦ scores, before the softmax
  void add_score_hook(const Owner& owner, TensorMap hook);
  void remove(const Owner& owner);
  bool has_prefix() const;
  bool has_score_hooks() const;

#if TESSERA_TARGET_ABI_MINOR >= 1
  // Since SDK 2.1. A prefix computed from the attention's input x (B, T, H) — the hidden
  // states the query projection reads — so it may differ by sample (UniPELT gates its
  // prefix by the input): x ↦ (K, V), each (B, num_heads(), length, head_dim). Its length is
  // declared, so masks and positions are laid out before it runs; it comes after the
  // input-free prefixes. With it installed the host runs the padded layout.
  void add_input_prefix(const Owner& owner, std::int64_t length, KVFromInput prefix);
  // Since SDK 2.1. The heads of the scores a hook sees (B, num_query_heads(), T, S). With
  // grouped-query attention num_heads() (key/value heads, which prefixes are laid out in)
  // is smaller: query head h reads key/value head h / (num_query_heads() / num_heads()).
  std::int64_t num_query_heads() const;
#endif
};

class EmbeddingSite : public SiteHandle {
 public:
  const std::string& name() const;  // "embed"
  const std::string& hf_path() const;
  std::int64_t hidden_size() const;

  void add_prompt(const Owner& owner, PerBatch prompt);  // batch ↦ (B, P, H)
  void remove(const Owner& owner);
  bool has_prompts() const;

#if TESSERA_TARGET_ABI_MINOR >= 1
  // Since SDK 2.1. Sees (B, P + T, H): the input of the first layer (T5: of the encoder's).
  void add_tap(const Owner& owner, HiddenTap tap);
#endif
#if TESSERA_TARGET_ABI_MINOR >= 7
  // Since SDK 2.7. Replaces the first layer's input x0 (B, P + T, H) — after the embedding
  // block's norm and dropout (T5: the encoder's; in generation, each call's new tokens) —
  // by transform(x0), token by token: AdapterHub's invertible adapters. Taps see the result.
  void add_transform(const Owner& owner, TensorMap transform);
#endif
};

class LayerSite : public SiteHandle {
 public:
  const std::string& name() const;  // "layers.3"
  const std::string& hf_path() const;
  std::int64_t index() const;

  void add_tap(const Owner& owner, HiddenTap tap);         // sees (B, T, H) after the layer
  void add_router(const Owner& owner, TensorMap router);  // h (B,T,H) -> keep (B,T) in {0,1}
  void remove(const Owner& owner);
  bool empty() const;

#if TESSERA_TARGET_ABI_MINOR >= 3
  // Since SDK 2.3. A module beside the whole layer, on every token, routed or not:
  // h (B,T,H), the layer's input ↦ (B,T,H), added to the layer's (routed) output before the
  // taps. CoDA's adapter: the tokens a router sends past the layer still get it.
  void add_parallel(const Owner& owner, TensorMap module);
#endif
#if TESSERA_TARGET_ABI_MINOR >= 7
  // Since SDK 2.7. Sees the layer's input h (B, T, H) before anything runs, read-only: a
  // side network's first ladder where no embedding site precedes the layer (T5's decoder).
  void add_input_tap(const Owner& owner, HiddenTap tap);
#endif
};

#if TESSERA_TARGET_ABI_MINOR >= 1
// Since SDK 2.1. The backbone's final hidden states, before the task head reads them
// (an encoder's last layer output; a decoder's, and T5's decoder's, after the final norm):
// side networks (LST) read and replace them here.
class OutputSite : public SiteHandle {
 public:
  const std::string& name() const;  // "output"
  const std::string& hf_path() const;
  std::int64_t hidden_size() const;

  void add_transform(const Owner& owner, TensorMap transform);  // h (B,T,H) -> (B,T,H), in install order
  void remove(const Owner& owner);
  bool empty() const;
#if TESSERA_TARGET_ABI_MINOR >= 7
  // Since SDK 2.7. As add_transform, for a function of each token's state alone (an
  // invertible adapter's inverse): generation keeps its KV cache, which a transform that
  // may read every earlier position makes the host give up.
  void add_token_wise_transform(const Owner& owner, TensorMap transform);
#endif
};
#endif

}  // namespace tessera

// Decoder-only language models, one implementation for two families, built from Tessera
// sites and loaded from a Hugging Face directory:
//
//   GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm, GELU(tanh) MLP,
//     Conv1D weights stored (in, out), fused c_attn, head tied to the embeddings.
//   LLaMA family (Touvron et al. 2023, arXiv:2302.13971; also Mistral, Qwen2, TinyLlama,
//     SmolLM): RMSNorm, rotary positions (Su et al. 2021) with linear / dynamic / llama3 / yarn
//     scaling, SwiGLU MLP, grouped-query attention, optional q/k/v(/o) biases, optional
//     sliding window, tied or untied head.
//
// Per layer (pre-norm):
//   n1 = Norm(h);  a = O · Attention(Q n1, K n1, V n1, causal ∧ padding)   layers.i.attn.{q,k,v,o}
//   h1 = h + attn-sublayer interventions(n1, a)                           layers.i.attn
//   n2 = Norm(h1); m = Down · (GELU(Up n2)  |  SiLU(Gate n2) ∘ Up n2)      layers.i.mlp.{up,gate,down}
//   h2 = h1 + mlp-sublayer interventions(n2, m)                           layers.i.mlp
// then logits = Head · Norm(h_L)                                          head
//
// GPT-2's fused c_attn is the linear site `layers.i.attn.qkv` (so PEFT's `c_attn` target
// resolves, with PEFT's fused ΔW); it also offers `layers.i.attn.{q,k,v}` whose weights
// are row blocks of the same tensor. One forward uses either the fused site or the three
// split ones: interventions on both in one layer are refused.
#pragma once

#include "architectures/site_model.h"

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

struct RopeConfig {
  std::string type = "default";  // default | linear | dynamic | llama3 | yarn
  double theta = 10000.0, factor = 1.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
  std::int64_t original_max_positions = 0;
  // yarn: the ramp's rotation bounds, whether its ends are rounded outwards, and the scale
  // of cos/sin (from `attention_factor`, or 0.1 ln(factor) + 1 with mscale refinements).
  double beta_fast = 32, beta_slow = 1, attention_factor = 1.0;
  bool truncate = true;
};

struct DecoderConfig {
  std::string model_type;  // gpt2 | llama | mistral | qwen2
  bool gpt2 = false;
  std::int64_t vocab_size = 0, hidden_size = 0, num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  std::int64_t intermediate_size = 0, max_positions = 0;
  double norm_eps = 1e-5, attention_dropout = 0.0, hidden_dropout = 0.0, embed_dropout = 0.0;
  std::string activation;  // gelu_new | gelu_pytorch_tanh | gelu | silu | relu
  bool qkv_bias = false, o_bias = false, mlp_bias = false, tie_word_embeddings = false;
  RopeConfig rope;
  std::int64_t sliding_window = 0;     // 0 = none
  std::vector<bool> sliding_layers;    // per layer: uses the sliding window (empty: all do when sliding_window > 0)
  std::int64_t bos_token_id = -1, pad_token_id = -1;
  std::vector<std::int64_t> eos_token_ids;
  static DecoderConfig from_json_file(const std::string& path);
  // `where` names the source in errors (config.json's path, or a GGUF file's).
  static DecoderConfig from_json(const nlohmann::json& j, const std::string& where);
  // A model directory's config.json, or a LLaMA GGUF file's metadata (formats/gguf_llama.h).
  static DecoderConfig of(const std::string& dir_or_gguf);
};

// Keys and values of earlier tokens, per layer, so that generation feeds one token at a
// time. `mask` covers every cached key (prefix keys, prompt tokens, padding).
struct KVCache {
  std::vector<Tensor> k, v;  // per layer: (B, kv_heads, L, head_dim)
  Tensor mask;               // (B, L) int64, 1 = real key
  std::int64_t positionless = 0;  // the first keys, prefixes' that are not earlier tokens (SDK 2.8)
  std::int64_t length() const { return mask.defined() ? mask.size(1) : 0; }
};

class DecoderModel final : public SiteModel {
 public:
  // keep_file_blocks: a GGUF file's Q4_0/Q4_1/Q8_0 layer weights stay its blocks while loading
  // (streamed: the f32 model is never held), for the storage stage to keep, quantize again or
  // make dense one at a time (architectures/weight_storage.h); call it then, before a forward pass.
  static std::unique_ptr<DecoderModel> load(const std::string& dir, c10::TensorOptions options, bool keep_file_blocks = false);

  // ids, mask: (B, T), mask 1 = real token (left or right padding). With a cache, the
  // cached keys come first and the cache is extended; embedding-site prompts and
  // attention-site prefixes enter only when the cache is empty.
  // Returns the final-norm hidden states (B, P + T, H), P = prompt tokens prepended;
  // zeros at padding when a forward without a cache skipped it (see Unpadded).
  Tensor forward(const Tensor& ids, const Tensor& mask, KVCache* cache = nullptr) const;
  Tensor logits(const Tensor& hidden) const;  // (…, H) -> (…, V) through the head site
  LinearSiteImpl& head() const { return *head_; }
  const DecoderConfig& config() const { return config_; }
  // The longest sequence a learned position table serves (GPT-2); 0 = no such limit (rotary).
  std::int64_t max_tokens() const { return config_.gpt2 ? config_.max_positions : 0; }
  // An output transform (LST's side network) may read every position of the sequence, not
  // only those a cached step feeds: generation then recomputes the sequence at each token.

 private:
  struct Layer {
    LinearSiteImpl *qkv = nullptr, *q, *k, *v, *o, *up, *gate = nullptr, *down;
    ParameterSiteImpl *norm1_w, *norm1_b = nullptr, *norm2_w, *norm2_b = nullptr;
    SublayerSiteImpl *attn, *mlp;
    AttentionSiteImpl* attention;
    LayerSiteImpl* layer;
    bool sliding = false;
  };
  DecoderModel() = default;
  void fused_qkv_views(Layer& l, const std::string& cn, const std::string& c_attn);
  Tensor norm(const Tensor& x, ParameterSiteImpl* w, ParameterSiteImpl* b) const;
  Tensor mlp(const Layer& l, const Tensor& x) const;
  // prefix: the attention site's (K, V) for this forward (first call only), else undefined.
  Tensor attention(const Layer& l, std::size_t index, const Tensor& x, const Tensor& positions, const Tensor& key_mask,
                   const std::pair<Tensor, Tensor>& rope, const std::pair<Tensor, Tensor>& prefix, KVCache* cache, bool all_real,
                   const Unpadded* u) const;
  std::pair<Tensor, Tensor> rope_tables(const Tensor& positions, c10::ScalarType dtype) const;  // cos, sin (B, 1, T, hd)

  DecoderConfig config_;
  std::vector<std::unique_ptr<ParameterSiteImpl>> views_;  // q/k/v blocks of GPT-2's fused weight
  ParameterSiteImpl *word_ = nullptr, *position_ = nullptr, *final_w_ = nullptr, *final_b_ = nullptr;
  LinearSiteImpl* head_ = nullptr;
  Tensor inv_freq_;  // (hd / 2) f32
  std::vector<Layer> layers_;
};

}  // namespace tessera

// The BERT encoder (Devlin et al. 2019, arXiv:1810.04805) and RoBERTa (Liu et al. 2019,
// arXiv:1907.11692: the same blocks, positions counted from pad_token_id + 1), built
// from Tessera sites and loaded from a Hugging Face directory (config.json +
// model.safetensors).
//
// Per layer (post-LayerNorm):
//   a  = Dropout(O · Attention(Q h, K h, V h, mask))   sites layers.i.attn.{q,k,v,o}
//   a  = attn-sublayer interventions(h, a)             site  layers.i.attn
//   h1 = LayerNorm(h + a)
//   m  = Dropout(Down · GELU(Up h1))                   sites layers.i.mlp.{up,down}
//   m  = mlp-sublayer interventions(h1, m)             site  layers.i.mlp
//   h2 = LayerNorm(h1 + m)
#pragma once

#include "architectures/site_model.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

class Checkpoint;

struct BertConfig {
  std::string model_type = "bert";  // "bert" or "roberta" (positions offset past the padding id)
  std::int64_t vocab_size = 0, hidden_size = 0, num_layers = 0, num_heads = 0, intermediate_size = 0;
  std::int64_t max_positions = 512, type_vocab_size = 2, pad_token_id = 0;
  double layer_norm_eps = 1e-12, hidden_dropout = 0.1, attention_dropout = 0.1;
  static BertConfig from_json_file(const std::string& path);
};

class BertModel final : public SiteModel {
 public:
  // Loads dir/config.json and dir/model.safetensors, converting to `options` (device,
  // dtype). Missing tensors are an error naming them.
  static std::unique_ptr<BertModel> load(const std::string& dir, c10::TensorOptions options);

  Encoded forward(const Tensor& input_ids, const Tensor& attention_mask) const;  // (B, T) each
  // The masked-LM head of a *ForMaskedLM checkpoint: (…, H) -> (…, V) through
  // GELU(dense) → LayerNorm → the `head` site (tied to the word embeddings) + bias.
  bool has_mlm_head() const { return head_ != nullptr; }
  Tensor mlm_logits(const Tensor& hidden) const;
  const BertConfig& config() const { return config_; }
  // The longest sequence the position table serves (RoBERTa's starts at pad_token_id + 1).
  std::int64_t max_tokens() const { return config_.max_positions - (config_.model_type == "roberta" ? config_.pad_token_id + 1 : 0); }

 private:
  struct Layer {
    LinearSiteImpl *q, *k, *v, *o, *up, *down;
    ParameterSiteImpl *attn_norm_w, *attn_norm_b, *mlp_norm_w, *mlp_norm_b;
    SublayerSiteImpl* attn;
    SublayerSiteImpl* mlp;
    AttentionSiteImpl* attention;
    LayerSiteImpl* layer;
  };
  BertModel() = default;
  void load_mlm_head(Checkpoint& file, c10::TensorOptions options);  // when the checkpoint has one
  // prefix: the attention site's (K, V) for this batch, undefined when it has none.
  using KV = std::pair<Tensor, Tensor>;
  Tensor attention(const Layer& l, const Tensor& h, const Tensor& mask, const KV& prefix, const Unpadded* u) const;
  Tensor layer_forward(const Layer& l, const Tensor& h, const Tensor& mask, const KV& prefix, const Unpadded* u) const;
  // The layer on the tokens routers keep (kept (B, T) bool), gathered: (B, k, H) with k the
  // most any row keeps, attending among themselves; scattered back into h's positions.
  Tensor routed_layer(const Layer& l, const Tensor& h, const Tensor& kept, const Tensor& mask, const KV& prefix) const;
  static std::int64_t prefix_keys(const Layer& l, const KV& prefix);

  BertConfig config_;
  ParameterSiteImpl *word_ = nullptr, *position_ = nullptr, *token_type_ = nullptr, *embed_norm_w_ = nullptr, *embed_norm_b_ = nullptr;
  std::vector<Layer> layers_;
  LinearSiteImpl *mlm_dense_ = nullptr, *head_ = nullptr;  // masked-LM head, when the checkpoint has one
  ParameterSiteImpl *mlm_norm_w_ = nullptr, *mlm_norm_b_ = nullptr;
};

}  // namespace tessera

// T5 (Raffel et al. 2020, arXiv:1910.10683) and T5 v1.1 (gated-GELU), the encoder-decoder,
// built from Tessera sites and loaded from a Hugging Face directory.
//
// Per encoder block (pre-norm, RMS norm without mean or bias):
//   a = O · Attention(Q n, K n, V n; bias = relative position buckets, no 1/√d)   encoder.layers.i.attn.{q,k,v,o}
//   m = Wo · act(Wi n)   or   Wo · (act(Wi0 n) ∘ Wi1 n)                          encoder.layers.i.mlp.{up,gate,down}
// Per decoder block: causal self-attention (one-directional buckets), cross-attention
// over the encoder output (decoder.layers.i.cross.{q,k,v,o}, sublayer decoder.layers.i.cross),
// then the MLP. Logits = Head · (h · d_model^-½ when the head is tied, as T5 v1.0 does).
//
// The relative position bias lives in the first block of each stack and is shared by all
// of them. A prefix in the decoder's self-attention counts as earlier target tokens (its
// keys get the bias of their distance, as transformers gives a PEFT prefix); one in the
// encoder or in cross-attention gets a zero bias.
#pragma once

#include "architectures/site_model.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

struct T5Config {
  std::int64_t vocab_size = 0, d_model = 0, d_kv = 0, d_ff = 0, num_layers = 0, num_decoder_layers = 0, num_heads = 0;
  std::int64_t buckets = 32, max_distance = 128;
  double eps = 1e-6, dropout = 0.1;
  bool gated = false, scale_output = true;
  std::string activation = "relu";
  std::int64_t pad_token_id = 0, eos_token_id = 1, decoder_start_token_id = 0;
  static T5Config from_json_file(const std::string& path);
};

// The decoder's keys and values of earlier target tokens, and the cross-attention keys
// and values of the encoder output (computed once).
struct Seq2SeqCache {
  std::vector<Tensor> self_k, self_v, cross_k, cross_v;  // per decoder layer: (B, nh, L or S, d_kv)
  std::int64_t length = 0;                               // target tokens seen
  std::int64_t prefix = 0;                               // self-attention prefix keys cached before them
};

class T5Model final : public SiteModel {
 public:
  static std::unique_ptr<T5Model> load(const std::string& dir, c10::TensorOptions options);

  Encoded encode(const Tensor& ids, const Tensor& mask) const;  // (B, S) each
  // Decoder hidden states (B, T, d) after the final norm for target inputs (B, T), which
  // start with decoder_start_token_id. Target padding sits at the end, so the causal
  // mask alone keeps it away from real tokens.
  Tensor decode(const Tensor& target_ids, const Encoded& source, Seq2SeqCache* cache = nullptr) const;
  Tensor logits(const Tensor& decoder_hidden) const;  // (…, d) -> (…, V): head(head_input(h))
  Tensor head_input(const Tensor& decoder_hidden) const;  // scaled by d^-½ when the head is tied
  LinearSiteImpl& head() const { return *head_; }
  const T5Config& config() const { return config_; }

 private:
  struct Attn {
    LinearSiteImpl *q, *k, *v, *o;
    ParameterSiteImpl* norm;
    SublayerSiteImpl* sub;
    AttentionSiteImpl* site;
  };
  struct Block {
    Attn self, cross;  // cross: decoder only
    LinearSiteImpl *up, *gate = nullptr, *down;
    ParameterSiteImpl* mlp_norm;
    SublayerSiteImpl* mlp;
    LayerSiteImpl* layer;
  };
  T5Model() = default;
  Tensor norm(const Tensor& x, ParameterSiteImpl* w) const;
  Tensor routed(const Tensor& keep, const Tensor& kept, std::int64_t past) const;
  Tensor ff(const Block& b, const Tensor& x) const;
  // Relative position bias (1, nh, T, S) for queries at offset..offset+T-1 and S keys.
  Tensor position_bias(ParameterSiteImpl* table, std::int64_t T, std::int64_t S, std::int64_t offset, bool bidirectional) const;
  // prefix: this forward's input-free prefix of the site when the caller evaluated it
  // (the decoder's self-attention, whose prefix sets positions); null: ask the site.
  Tensor attention(const Attn& a, const Tensor& x, const Tensor& kv_source, const Tensor& keep, const Tensor& bias,
                   Tensor* cache_k, Tensor* cache_v, bool append, const std::pair<Tensor, Tensor>* prefix = nullptr) const;

  T5Config config_;
  ParameterSiteImpl *shared_ = nullptr, *enc_bias_ = nullptr, *dec_bias_ = nullptr, *enc_final_ = nullptr, *dec_final_ = nullptr;
  LinearSiteImpl* head_ = nullptr;
  std::vector<Block> encoder_, decoder_;
};

}  // namespace tessera

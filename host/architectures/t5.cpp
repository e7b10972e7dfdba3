#include "architectures/t5.h"

#include "architectures/attention.h"
#include "architectures/recompute.h"
#include "formats/checkpoint.h"
#include "architectures/functional.h"
#include "formats/json_file.h"

#include <tessera/dropout.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>

namespace tessera {

T5Config T5Config::from_json_file(const std::string& path) {
  const nlohmann::json j = read_json_file(path);
  const JsonFields f(j, path);
  const std::string type = f.string_or("model_type", "");
  if (type != "t5") throw std::runtime_error(path + ": model_type '" + type + "' is not an encoder-decoder we support (supported: t5)");
  T5Config c;
  c.vocab_size = f.size("vocab_size");
  c.d_model = f.size("d_model");
  c.d_kv = f.size("d_kv");
  c.d_ff = f.size("d_ff");
  c.num_layers = f.size("num_layers");
  c.num_decoder_layers = f.size_or("num_decoder_layers", c.num_layers);
  c.num_heads = f.size("num_heads");
  c.buckets = f.size_or("relative_attention_num_buckets", c.buckets);
  c.max_distance = f.size_or("relative_attention_max_distance", c.max_distance);
  // Buckets: half of them (a quarter per direction in the encoder) are exact distances, the
  // rest grow logarithmically from there to max_distance, which must lie beyond them.
  if (c.buckets < 4) f.fail("relative_attention_num_buckets", "must be at least 4, got " + std::to_string(c.buckets));
  if (c.max_distance <= c.buckets / 2)
    f.fail("relative_attention_max_distance", "must exceed half of relative_attention_num_buckets (" + std::to_string(c.buckets / 2) + "), got " + std::to_string(c.max_distance));
  c.eps = f.nonnegative_or("layer_norm_epsilon", c.eps);
  c.dropout = f.probability_or("dropout_rate", c.dropout);
  // "relu" (T5) or "gated-gelu" (v1.1), in general [gated-]ACT; gated-gelu means gelu_new.
  const std::string ff = f.string_or("feed_forward_proj", "relu");
  c.gated = ff.rfind("gated-", 0) == 0;
  c.activation = ff == "gated-gelu" ? "gelu_new" : (c.gated ? ff.substr(6) : ff);
  if (!known_activation(c.activation)) throw std::runtime_error(path + ": feed_forward_proj '" + ff + "' is not supported");
  // T5 v1.0 scales the decoder output by d_model^-½ before its tied head; v1.1 does not.
  c.scale_output = f.bool_or("scale_decoder_outputs", f.bool_or("tie_word_embeddings", true));
  c.pad_token_id = f.int_or("pad_token_id", 0);
  c.eos_token_id = f.int_or("eos_token_id", 1);
  c.decoder_start_token_id = f.int_or("decoder_start_token_id", c.pad_token_id);
  // The decoder's first input goes through the embedding.
  if (c.decoder_start_token_id < 0 || c.decoder_start_token_id >= c.vocab_size)
    f.fail(f.has("decoder_start_token_id") ? "decoder_start_token_id" : "pad_token_id", "(the decoder's start token) must be a token id below vocab_size (" + std::to_string(c.vocab_size) + "), got " + std::to_string(c.decoder_start_token_id));
  return c;
}

std::unique_ptr<T5Model> T5Model::load(const std::string& dir, c10::TensorOptions options) {
  std::unique_ptr<T5Model> m(new T5Model());
  const std::string config = (std::filesystem::path(dir) / "config.json").string();
  m->config_ = T5Config::from_json_file(config);
  const auto& c = m->config_;
  Checkpoint file = Checkpoint::open(dir);
  file.check_layer_count(config, "num_layers", c.num_layers, "encoder.block.");
  file.check_layer_count(config, "num_decoder_layers", c.num_decoder_layers, "decoder.block.");
  const auto d = c.d_model, inner = c.num_heads * c.d_kv;
  auto tensor = [&](const std::string& canonical, const std::string& hf, const std::vector<int64_t>& shape) {
    return m->held_by(hf, m->param(canonical, hf, file.take(hf, shape, options)));
  };
  m->shared_ = tensor("embed.word.weight", "shared.weight", {c.vocab_size, d});
  m->embed_site_ = std::make_unique<EmbeddingSiteImpl>("embed", "shared", d);
  m->output("decoder.final_layer_norm", d);
  // The stacks' own embed_tokens are the shared matrix (stored only by some writers).
  for (const char* tied : {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"})
    if (file.contains(tied)) {
      file.take(tied, {c.vocab_size, d}, options);
      m->held_by(tied, m->shared_);
    }

  auto attn = [&](const std::string& cn, const std::string& hf, const char* kind, const char* hf_kind) {
    Attn a{};
    auto lin = [&](const char* name, std::int64_t out, std::int64_t in) {
      const std::string cname = cn + "." + kind + "." + name, hname = hf + "." + hf_kind + "." + name;
      return m->linear(cname, hname, tensor(cname + ".weight", hname + ".weight", {out, in}), nullptr);
    };
    a.q = lin("q", inner, d), a.k = lin("k", inner, d), a.v = lin("v", inner, d), a.o = lin("o", d, inner);
    // Self-attention reads one x for q, k and v; cross-attention's k and v read the encoder's output.
    if (std::string(kind) == "attn") share_input({a.q, a.k, a.v});
    else share_input({a.k, a.v});
    a.norm = tensor(cn + "." + kind + ".norm.weight", hf + ".layer_norm.weight", {d});
    a.sub = m->sublayer(cn + "." + kind, hf + "." + hf_kind, d);
    a.site = m->attention_site(cn + "." + kind, hf + "." + hf_kind, c.num_heads, c.d_kv);
    return a;
  };
  auto stack = [&](const std::string& which, std::int64_t layers, std::vector<Block>& blocks) {
    const bool dec = which == "decoder";
    for (std::int64_t i = 0; i < layers; ++i) {
      const std::string cn = which + ".layers." + std::to_string(i), hf = which + ".block." + std::to_string(i);
      Block b{};
      b.self = attn(cn, hf + ".layer.0", "attn", "SelfAttention");
      if (dec) b.cross = attn(cn, hf + ".layer.1", "cross", "EncDecAttention");
      const std::string ffp = hf + ".layer." + (dec ? "2" : "1");
      auto lin = [&](const char* name, const char* hname, std::int64_t out, std::int64_t in) {
        const std::string cname = cn + ".mlp." + name, hpath = ffp + ".DenseReluDense." + hname;
        return m->linear(cname, hpath, tensor(cname + ".weight", hpath + ".weight", {out, in}), nullptr);
      };
      if (c.gated) {
        b.gate = lin("gate", "wi_0", c.d_ff, d);
        b.up = lin("up", "wi_1", c.d_ff, d);
        share_input({b.gate, b.up});
      } else {
        b.up = lin("up", "wi", c.d_ff, d);
      }
      b.down = lin("down", "wo", d, c.d_ff);
      b.mlp_norm = tensor(cn + ".mlp.norm.weight", ffp + ".layer_norm.weight", {d});
      b.mlp = m->sublayer(cn + ".mlp", ffp + ".DenseReluDense", d);
      b.layer = m->layer_site(cn, hf, i);
      blocks.push_back(b);
    }
    (dec ? m->dec_bias_ : m->enc_bias_) = tensor(which + ".position_bias.weight", which + ".block.0.layer.0.SelfAttention.relative_attention_bias.weight", {c.buckets, c.num_heads});
    (dec ? m->dec_final_ : m->enc_final_) = tensor(which + ".norm.weight", which + ".final_layer_norm.weight", {d});
  };
  stack("encoder", c.num_layers, m->encoder_);
  stack("decoder", c.num_decoder_layers, m->decoder_);
  // The head is the shared embedding unless the checkpoint stores its own.
  ParameterSiteImpl* head_w = m->shared_;
  if (file.contains("lm_head.weight")) head_w = tensor("head.weight", "lm_head.weight", {c.vocab_size, d});
  m->head_ = m->linear("head", "lm_head", head_w, nullptr);
  m->ignored_ = file.finish();

  // transformers keeps wo in f32 when it loads T5 in 4 or 8 bits (its activations overflow
  // otherwise); a quantized load here does the same.
  m->keep_dense_ = {"mlp.down"};
  m->describe({"t5", d, c.num_layers + c.num_decoder_layers, c.num_heads, c.d_ff, c.vocab_size, {}, {}}, options);
  return m;
}

Tensor T5Model::norm(const Tensor& x, ParameterSiteImpl* w) const { return rms_norm(x, w->value(), config_.eps); }

Tensor T5Model::ff(const Block& b, const Tensor& x) const {
  return b.down->forward(tessera::dropout(ffn_hidden(b.gate, *b.up, config_.activation, x), config_.dropout, training_));
}

Tensor T5Model::position_bias(ParameterSiteImpl* table, std::int64_t T, std::int64_t S, std::int64_t offset, bool bidirectional) const {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(table->base().device());
  Tensor rel = at::arange(S, opts).view({1, S}) - (at::arange(T, opts).view({T, 1}) + offset);  // key − query, (T, S)
  std::int64_t n = config_.buckets;
  Tensor bucket = at::zeros_like(rel);
  if (bidirectional) {
    n /= 2;
    bucket = bucket + rel.gt(0).to(at::kLong) * n;
    rel = rel.abs();
  } else {
    rel = (-rel).clamp_min(0);
  }
  // Half the buckets are exact distances; the rest grow logarithmically up to max_distance.
  const std::int64_t exact = n / 2;
  Tensor large = exact + (at::log(rel.to(at::kFloat) / static_cast<double>(exact)) /
                          std::log(static_cast<double>(config_.max_distance) / static_cast<double>(exact)) *
                          static_cast<double>(n - exact)).to(at::kLong);
  large = at::minimum(large, at::full_like(large, n - 1));
  bucket = bucket + at::where(rel.lt(exact), rel, large);
  return at::embedding(table->value(), bucket).permute({2, 0, 1}).unsqueeze(0);  // (1, nh, T, S)
}

Tensor T5Model::attention(const Attn& a, const Tensor& x, const Tensor& kv_source, const Tensor& keep, const Tensor& bias,
                          Tensor* cache_k, Tensor* cache_v, bool append, const KVPair* given) const {
  // x (B, T, d); kv_source (B, S, d); keep (B or 1, 1, T or 1, S) bool; bias (1, nh, T, S) or undefined
  const auto B = x.size(0), T = x.size(1), nh = config_.num_heads, dk = config_.d_kv;
  auto heads = [&](const Tensor& y) { return y.view({B, y.size(1), nh, dk}).transpose(1, 2); };
  Tensor q = heads(a.q->forward(x)), k, v;
  const bool first = cache_k == nullptr || !cache_k->defined();
  if (!append && !first) {  // cross-attention: the encoder's keys and values, computed once
    k = *cache_k, v = *cache_v;
  } else {
    k = heads(a.k->forward(kv_source)), v = heads(a.v->forward(kv_source));
    if (first) {  // keys: [prefix ; input prefix (from the query's input x) ; source]
      const auto prefix = a.site->weigh_prefix(given ? *given : a.site->prefix(B), x), in = a.site->input_prefix(x);
      prepend_prefixes(k, v, {&prefix, &in});
    } else {
      k = at::cat({*cache_k, k}, 2), v = at::cat({*cache_v, v}, 2);
    }
    if (cache_k) *cache_k = k, *cache_v = v;
  }
  // Prefix keys the caller's mask and bias do not cover (the encoder's, cross-attention's)
  // are always visible and carry no position bias.
  Tensor keep_all = keep, bias_all = bias;
  const auto P = k.size(2) - keep.size(-1);
  if (P > 0) {
    keep_all = at::cat({at::ones({keep.size(0), 1, keep.size(2), P}, keep.options()), keep}, -1);
    if (bias.defined()) bias_all = at::cat({at::zeros({1, nh, bias.size(2), P}, bias.options()), bias}, -1);
  }
  // T5 folds 1/√d into its initialization: scores are QKᵀ + bias, unscaled.
  Tensor ctx = attend(q, k, v, keep_all, config_.dropout, training_, *a.site, bias_all, 1.0);  // (B, nh, T, dk)
  return a.o->forward(ctx.transpose(1, 2).reshape({B, T, nh * dk}));
}

// keep (B or 1, 1, T or 1, S) with routers' kept (B, T) over the last T keys: kept queries
// see kept keys (earlier keys stay visible), every query itself.
Tensor T5Model::routed(const Tensor& keep, const Tensor& kept, std::int64_t past) const {
  if (!kept.defined()) return keep;
  const auto B = kept.size(0), T = kept.size(1), S = past + T;
  const Tensor keys = at::cat({at::ones({B, past}, kept.options()), kept}, 1).view({B, 1, 1, S});
  const Tensor self = (at::arange(S, kept.options().dtype(at::kLong)).view({1, S}) == at::arange(past, S, kept.options().dtype(at::kLong)).view({T, 1}))
                          .view({1, 1, T, S});
  return keep.logical_and(keys).logical_or(self);  // (B, 1, T, S)
}

Encoded T5Model::encode(const Tensor& ids, const Tensor& mask) const {
  Encoded out;
  Tensor x = at::embedding(shared_->value(), ids);  // (B, S, d)
  x = embed_site_->prepend(x, &out.prompt_length);
  const auto B = x.size(0), S = x.size(1);
  out.mask = out.prompt_length > 0 ? at::cat({at::ones({B, out.prompt_length}, mask.options()), mask}, 1) : mask;
  x = tessera::dropout(x, config_.dropout, training_);
  enter_forward(out.mask, nullptr);  // before the embedding transforms: a gate over them reads this forward's mask
  x = embed_site_->enter(x);
  const Tensor bias = position_bias(enc_bias_, S, S, 0, true);
  const Tensor keep = out.mask.to(at::kBool).view({B, 1, 1, S});
  // Layer b on x with the position bias (extras[0], which carries a gradient when a method
  // trains the bias table) and its attention's prefix (extras[1], [2] when there is one: made
  // once per forward, outside the layer, as the decoder's). By value: a recomputed layer runs
  // it again in backward, where it sets the encoder's forward context again (the decoder's is
  // current by then).
  auto layer = [this, keep, mask = out.mask](const Block* b, const Tensor& x, const std::vector<Tensor>& extras) {
    if (at::GradMode::is_enabled() && gradient_checkpointing()) enter_forward(mask, nullptr);
    const KVPair prefix = extras.size() > 1 ? KVPair{extras[1], extras[2]} : KVPair{};
    return b->layer->run(x, [&](const Tensor& h, const Tensor& kept) {
      Tensor n = norm(h, b->self.norm);
      Tensor a = tessera::dropout(attention(b->self, n, n, routed(keep, kept, 0), extras[0], nullptr, nullptr, false, &prefix), config_.dropout, training_);
      Tensor h1 = h + b->self.sub->apply(n, a, h, SublayerSiteImpl::identity());
      Tensor n2 = norm(h1, b->mlp_norm);
      return h1 + b->mlp->apply(n2, tessera::dropout(ff(*b, n2), config_.dropout, training_), h1, SublayerSiteImpl::identity());
    });
  };
  const bool recompute = gradient_checkpointing() && training_ && at::GradMode::is_enabled();
  for (const auto& b : encoder_) {
    std::vector<Tensor> extras{bias};
    const auto kv = prefix_extras(b.self.site->prefix(B));
    extras.insert(extras.end(), kv.begin(), kv.end());
    x = !recompute ? layer(&b, x, extras) : recomputed_layer(x, extras, [layer, b = &b](const Tensor& h, const std::vector<Tensor>& e) { return layer(b, h, e); });
  }
  out.hidden = tessera::dropout(norm(x, enc_final_), config_.dropout, training_);
  return out;
}

Tensor T5Model::decode(const Tensor& target_ids, const Encoded& source, Seq2SeqCache* cache) const {
  const std::int64_t T = target_ids.size(1), B = target_ids.size(0);
  const auto L = static_cast<std::size_t>(config_.num_decoder_layers);
  if (cache && cache->self_k.size() != L) cache->self_k.resize(L), cache->self_v.resize(L), cache->cross_k.resize(L), cache->cross_v.resize(L);
  // Self-attention prefixes count as earlier target tokens, as transformers counts a PEFT
  // prefix in the decoder's cache: queries sit after them and their keys get the relative
  // position bias of that distance. They are evaluated once, at the first call. Positionless
  // prefixes (SDK 2.8) come first among the keys and get no bias, as the encoder's prefixes.
  enter_forward(at::ones({B, T}, target_ids.options()), nullptr);  // before the prefixes: they may read it
  const bool first = cache == nullptr || cache->length == 0;
  std::vector<KVPair> prefixes;
  std::int64_t P = cache ? cache->prefix : 0;
  if (first) {
    for (const auto& b : decoder_) prefixes.push_back(b.self.site->prefix(B));
    auto keys = [&](std::size_t i) { return (prefixes[i].first.defined() ? prefixes[i].first.size(2) : 0) + decoder_[i].self.site->input_prefix_length(); };
    auto past_keys = [&](std::size_t i) { return decoder_[i].self.site->positioned_prefix_length() + decoder_[i].self.site->input_prefix_length(); };
    P = prefixes.empty() ? 0 : past_keys(0);
    for (std::size_t i = 1; i < prefixes.size(); ++i)
      if (keys(i) != keys(0) || past_keys(i) != P) throw std::runtime_error(decoder_[i].self.site->name() + ": decoder self-attention prefixes of different lengths are not supported");
    if (cache) cache->prefix = P;
  }
  const std::int64_t past = P + (cache ? cache->length : 0);  // keys before this call's tokens
  Tensor y = tessera::dropout(at::embedding(shared_->value(), target_ids), config_.dropout, training_);  // (B, T, d)
  const Tensor bias = position_bias(dec_bias_, T, past + T, past, false);
  const auto lopts = target_ids.options();
  const Tensor causal = (at::arange(past + T, lopts).view({1, past + T}) <= at::arange(past, past + T, lopts).view({T, 1})).view({1, 1, T, past + T});
  const Tensor cross_keep = source.mask.to(at::kBool).view({source.mask.size(0), 1, 1, source.mask.size(1)});
  // Layer i on y; extras: the position bias, the encoder's output, and the self-attention
  // prefix's K and V when there is one — what reaches the layer from outside with a gradient.
  // By value, as the encoder's (a recomputed layer runs without a cache, so `first` holds).
  const Tensor decoder_mask = at::ones({B, T}, target_ids.options());
  auto layer = [this, causal, cross_keep, past, first, cache, decoder_mask](std::size_t i, const Tensor& y, const std::vector<Tensor>& extras) {
    if (at::GradMode::is_enabled() && gradient_checkpointing()) enter_forward(decoder_mask, nullptr);
    const Block& b = decoder_[i];
    const KVPair prefix = extras.size() > 2 ? KVPair{extras[2], extras[3]} : KVPair{};
    return b.layer->run(y, [&](const Tensor& h, const Tensor& kept) {
      Tensor n = norm(h, b.self.norm);
      Tensor a = attention(b.self, n, n, routed(causal, kept, past), extras[0], cache ? &cache->self_k[i] : nullptr, cache ? &cache->self_v[i] : nullptr, true,
                           first ? &prefix : nullptr);
      Tensor h1 = h + b.self.sub->apply(n, tessera::dropout(a, config_.dropout, training_), h, SublayerSiteImpl::identity());
      Tensor n2 = norm(h1, b.cross.norm);
      Tensor c = attention(b.cross, n2, extras[1], cross_keep, Tensor(), cache ? &cache->cross_k[i] : nullptr, cache ? &cache->cross_v[i] : nullptr, false);
      Tensor h2 = h1 + b.cross.sub->apply(n2, tessera::dropout(c, config_.dropout, training_), h1, SublayerSiteImpl::identity());
      Tensor n3 = norm(h2, b.mlp_norm);
      return h2 + b.mlp->apply(n3, tessera::dropout(ff(b, n3), config_.dropout, training_), h2, SublayerSiteImpl::identity());
    });
  };
  const bool recompute = gradient_checkpointing() && training_ && cache == nullptr && at::GradMode::is_enabled();
  for (std::size_t i = 0; i < decoder_.size(); ++i) {
    std::vector<Tensor> extras{bias, source.hidden};
    if (first) {
      const auto kv = prefix_extras(prefixes[i]);
      extras.insert(extras.end(), kv.begin(), kv.end());
    }
    y = !recompute ? layer(i, y, extras) : recomputed_layer(y, extras, [layer, i](const Tensor& h, const std::vector<Tensor>& e) { return layer(i, h, e); });
  }
  if (cache) cache->length += T;
  return output_site_->apply(tessera::dropout(norm(y, dec_final_), config_.dropout, training_));
}

Tensor T5Model::head_input(const Tensor& decoder_hidden) const {
  return config_.scale_output ? decoder_hidden * std::pow(static_cast<double>(config_.d_model), -0.5) : decoder_hidden;
}

Tensor T5Model::logits(const Tensor& decoder_hidden) const { return head_->forward(head_input(decoder_hidden)); }

}  // namespace tessera

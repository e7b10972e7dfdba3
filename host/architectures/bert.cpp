#include "architectures/bert.h"

#include "architectures/attention.h"
#include "architectures/recompute.h"
#include "formats/checkpoint.h"
#include "formats/json_file.h"

#include <tessera/dropout.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <optional>

namespace tessera {

BertConfig BertConfig::from_json_file(const std::string& path) {
  const nlohmann::json j = read_json_file(path);
  const JsonFields f(j, path);
  const std::string type = f.string_or("model_type", "");
  if (type != "bert" && type != "roberta")
    throw std::runtime_error(path + ": model_type '" + type + "' is not supported (supported: bert, roberta)");
  const std::string act = f.string_or("hidden_act", "gelu"), positions = f.string_or("position_embedding_type", "absolute");
  if (act != "gelu") f.fail("hidden_act", "'" + act + "' is not supported (supported: gelu)");
  if (positions != "absolute") f.fail("position_embedding_type", "'" + positions + "' is not supported (supported: absolute)");
  BertConfig c;
  c.model_type = type;
  c.vocab_size = f.size("vocab_size");
  c.hidden_size = f.size("hidden_size");
  c.num_layers = f.size("num_hidden_layers");
  c.num_heads = f.size("num_attention_heads");
  c.intermediate_size = f.size("intermediate_size");
  c.max_positions = f.size_or("max_position_embeddings", c.max_positions);
  c.type_vocab_size = f.size_or("type_vocab_size", c.type_vocab_size);
  c.pad_token_id = f.int_or("pad_token_id", c.pad_token_id);
  c.layer_norm_eps = f.nonnegative_or("layer_norm_eps", c.layer_norm_eps);
  c.hidden_dropout = f.probability_or("hidden_dropout_prob", c.hidden_dropout);
  c.attention_dropout = f.probability_or("attention_probs_dropout_prob", c.attention_dropout);
  if (c.hidden_size % c.num_heads != 0) throw std::runtime_error(path + ": hidden_size is not a multiple of num_attention_heads");
  return c;
}

std::unique_ptr<BertModel> BertModel::load(const std::string& dir, c10::TensorOptions options) {
  namespace fs = std::filesystem;
  std::unique_ptr<BertModel> m(new BertModel());
  m->config_ = BertConfig::from_json_file((fs::path(dir) / "config.json").string());
  const auto& c = m->config_;
  Checkpoint file = Checkpoint::open(dir);

  // Checkpoints of task heads (BertFor*, RobertaFor*) prefix every encoder tensor.
  const std::string head_prefix = c.model_type + ".";
  const std::string prefix = file.contains(head_prefix + "embeddings.word_embeddings.weight") ? head_prefix : "";
  // The parameter site of the encoder tensor prefix + hf, under its canonical name.
  auto tensor = [&](const std::string& canonical, const std::string& hf, std::vector<int64_t> shape) {
    std::string name = prefix + hf;
    // Old TF-converted checkpoints call LayerNorm's parameters gamma and beta.
    auto old = [&](const std::string& from, const std::string& to) {
      if (name.size() <= from.size() || name.compare(name.size() - from.size(), from.size(), from) != 0) return name;
      return name.substr(0, name.size() - from.size()) + to;
    };
    name = file.first_present({name, old("LayerNorm.weight", "LayerNorm.gamma"), old("LayerNorm.bias", "LayerNorm.beta")}).value_or(name);
    return m->held_by(name, m->param(canonical, prefix + hf, file.take(name, shape, options)));
  };
  file.check_layer_count((fs::path(dir) / "config.json").string(), "num_hidden_layers", c.num_layers, prefix + "encoder.layer.");
  const auto H = c.hidden_size, I = c.intermediate_size;
  m->word_ = tensor("embed.word.weight", "embeddings.word_embeddings.weight", {c.vocab_size, H});
  m->position_ = tensor("embed.position.weight", "embeddings.position_embeddings.weight", {c.max_positions, H});
  m->token_type_ = tensor("embed.token_type.weight", "embeddings.token_type_embeddings.weight", {c.type_vocab_size, H});
  m->embed_norm_w_ = tensor("embed.norm.weight", "embeddings.LayerNorm.weight", {H});
  m->embed_norm_b_ = tensor("embed.norm.bias", "embeddings.LayerNorm.bias", {H});
  m->embed_site_ = std::make_unique<EmbeddingSiteImpl>("embed", prefix + "embeddings", H);
  m->output(prefix + "encoder", H);

  for (std::int64_t i = 0; i < c.num_layers; ++i) {
    const std::string cn = "layers." + std::to_string(i), hf = "encoder.layer." + std::to_string(i);
    auto lin = [&](const std::string& cname, const std::string& hname, std::int64_t out, std::int64_t in) {
      auto* w = tensor(cn + "." + cname + ".weight", hf + "." + hname + ".weight", {out, in});
      auto* b = tensor(cn + "." + cname + ".bias", hf + "." + hname + ".bias", {out});
      return m->linear(cn + "." + cname, prefix + hf + "." + hname, w, b);
    };
    auto norm = [&](const std::string& cname, const std::string& hname, const char* which) {
      return tensor(cn + "." + cname + "." + which, hf + "." + hname + "." + which, {H});
    };
    Layer l{};
    l.q = lin("attn.q", "attention.self.query", H, H);
    l.k = lin("attn.k", "attention.self.key", H, H);
    l.v = lin("attn.v", "attention.self.value", H, H);
    share_input({l.q, l.k, l.v});
    l.o = lin("attn.o", "attention.output.dense", H, H);
    l.up = lin("mlp.up", "intermediate.dense", I, H);
    l.down = lin("mlp.down", "output.dense", H, I);
    l.attn_norm_w = norm("attn.norm", "attention.output.LayerNorm", "weight");
    l.attn_norm_b = norm("attn.norm", "attention.output.LayerNorm", "bias");
    l.mlp_norm_w = norm("mlp.norm", "output.LayerNorm", "weight");
    l.mlp_norm_b = norm("mlp.norm", "output.LayerNorm", "bias");
    l.attn = m->sublayer(cn + ".attn", prefix + hf + ".attention", H);
    l.mlp = m->sublayer(cn + ".mlp", prefix + hf + ".output", H);
    l.attention = m->attention_site(cn + ".attn", prefix + hf + ".attention.self", c.num_heads, H / c.num_heads);
    l.layer = m->layer_site(cn, prefix + hf, i);
    m->layers_.push_back(l);
  }
  m->load_mlm_head(file, options);
  m->ignored_ = file.finish();  // pooler, position_ids, other task heads

  m->describe({c.model_type, H, c.num_layers, c.num_heads, I, c.vocab_size, {}, {}}, options);
  return m;
}

// The masked-LM head (BertForMaskedLM: cls.predictions.*, RobertaForMaskedLM: lm_head.*),
// stored outside the encoder's prefix; its decoder weight is the word embedding matrix.
void BertModel::load_mlm_head(Checkpoint& file, c10::TensorOptions options) {
  const bool bert_mlm = file.contains("cls.predictions.transform.dense.weight"), roberta_mlm = file.contains("lm_head.dense.weight");
  if (!bert_mlm && !roberta_mlm) return;
  const std::string hp = bert_mlm ? "cls.predictions." : "lm_head.", dense = bert_mlm ? "transform.dense" : "dense",
                    norm = bert_mlm ? "transform.LayerNorm" : "layer_norm";
  const auto H = config_.hidden_size, V = config_.vocab_size;
  auto head_param = [&](const std::string& canonical, const std::string& hf, std::vector<int64_t> shape) {
    return held_by(hp + hf, param(canonical, hp + hf, file.take(hp + hf, shape, options)));
  };
  mlm_dense_ = linear("mlm.dense", hp + dense, head_param("mlm.dense.weight", dense + ".weight", {H, H}), head_param("mlm.dense.bias", dense + ".bias", {H}));
  mlm_norm_w_ = head_param("mlm.norm.weight", norm + ".weight", {H});
  mlm_norm_b_ = head_param("mlm.norm.bias", norm + ".bias", {H});
  auto* head_bias = head_param("head.bias", "bias", {V});
  // The tied copies, which transformers makes the word embedding and the head's bias.
  auto tied = [&](const std::string& name, ParameterSiteImpl* site, const std::vector<int64_t>& shape) {
    if (!file.contains(name)) return;
    file.take(name, shape, options);
    held_by(name, site);
  };
  tied(hp + "decoder.weight", word_, {V, H});
  tied(hp + "decoder.bias", head_bias, {V});
  head_ = linear("head", hp + "decoder", word_, head_bias);
}

Tensor BertModel::attention(const Layer& l, const Tensor& h, const Tensor& mask, const KV& prefix, const Unpadded* u) const {
  // h: (B, T, H), or (N, H) real tokens when unpadded; mask: (B, S) with S = prefix + T, 1 = attend
  const auto B = u ? u->batch : h.size(0), T = u ? u->seq : h.size(1);
  const auto H = config_.hidden_size, nh = config_.num_heads, hd = H / nh;
  auto heads = [&](Tensor x) {  // -> (B, nh, T, hd)
    return (u ? u->padded(x) : x).view({B, T, nh, hd}).transpose(1, 2);
  };
  Tensor q = heads(l.q->forward(h)), k = heads(l.k->forward(h)), v = heads(l.v->forward(h));
  const KV in = l.attention->input_prefix(h);  // (B, nh, P_in, hd) each; input prefixes keep the padded layout
  const KV weighed = l.attention->weigh_prefix(prefix, h);  // gated or routed prefixes, from the layer's input
  prepend_prefixes(k, v, {&weighed, &in});  // keys: [prefix ; input prefix ; tokens]
  if (mask.defined() && mask.size(1) != k.size(2)) throw std::runtime_error("attention mask covers " + std::to_string(mask.size(1)) + " keys, not " + std::to_string(k.size(2)));
  // An undefined mask: every key is real, no mask at all (the kernels' fastest path).
  Tensor keep = mask.defined() ? mask.to(at::kBool).view({B, 1, 1, k.size(2)}) : Tensor();
  Tensor ctx = attend(q, k, v, keep, config_.attention_dropout, training_, *l.attention);  // (B, nh, T, hd)
  ctx = ctx.transpose(1, 2).reshape({B * T, H});
  return u ? ctx.index_select(0, u->index) : ctx.view({B, T, H});  // (N, H) or (B, T, H)
}

// How many keys a layer's prefixes put in front of the tokens: the input-free ones and the
// declared input prefixes.
std::int64_t BertModel::prefix_keys(const Layer& l, const KV& prefix) {
  return (prefix.first.defined() ? prefix.first.size(2) : 0) + l.attention->input_prefix_length();
}

Tensor BertModel::routed_layer(const Layer& l, const Tensor& h, const Tensor& kept, const Tensor& mask, const KV& prefix) const {
  // h (B, T, H): routers keep the padded layout; mask (B, P + T) or undefined (all real)
  const auto B = h.size(0), T = h.size(1), H = h.size(2);
  const auto P = mask.defined() ? mask.size(1) - T : std::int64_t{0};
  const Tensor run = mask.defined() ? kept.logical_and(mask.narrow(1, P, T).to(at::kBool)) : kept;  // (B, T)
  const Tensor count = run.sum(1);                                                                  // (B)
  const auto k = count.max().item<std::int64_t>();
  if (k == 0) return h;
  // Each row's kept tokens first, in their order: (B, k) positions.
  const Tensor order = std::get<1>(at::sort(run.to(at::kInt), /*stable=*/true, /*dim=*/1, /*descending=*/true)).narrow(1, 0, k);
  const Tensor idx = order.unsqueeze(-1).expand({B, k, H});
  Tensor keys = run.gather(1, order);  // (B, k): the slots holding a kept token
  // A row that keeps nothing still needs a key for its (dropped) queries.
  keys = keys.logical_or(count.eq(0).unsqueeze(1).logical_and(at::arange(k, order.options()).eq(0).unsqueeze(0)));
  Tensor sub_mask = keys.to(at::kLong);
  const auto P_all = prefix_keys(l, prefix);
  if (P_all > 0) sub_mask = at::cat({at::ones({B, P_all}, sub_mask.options()), sub_mask}, 1);
  const Tensor out = layer_forward(l, h.gather(1, idx), sub_mask, prefix, nullptr);  // (B, k, H)
  return h.scatter(1, idx, out);  // (B, T, H): the layer's result at kept positions
}

Tensor BertModel::layer_forward(const Layer& l, const Tensor& h, const Tensor& mask, const KV& prefix, const Unpadded* u) const {
  const double p = config_.hidden_dropout;
  const std::vector<int64_t> H{config_.hidden_size};  // owned: an IntArrayRef of a braced list dangles
  Tensor a = tessera::dropout(l.o->forward(attention(l, h, mask, prefix, u)), p, training_);
  const TensorMap attn_norm = [&](const Tensor& t) { return at::layer_norm(t, H, l.attn_norm_w->value(), l.attn_norm_b->value(), config_.layer_norm_eps); };
  const TensorMap mlp_norm = [&](const Tensor& t) { return at::layer_norm(t, H, l.mlp_norm_w->value(), l.mlp_norm_b->value(), config_.layer_norm_eps); };
  a = l.attn->apply(h, a, h, attn_norm);
  Tensor h1 = attn_norm(h + a);
  Tensor mm = tessera::dropout(l.down->forward(l.up->forward(h1, Activation::gelu)), p, training_);
  mm = l.mlp->apply(h1, mm, h1, mlp_norm);
  return mlp_norm(h1 + mm);
}

Tensor BertModel::mlm_logits(const Tensor& hidden) const {
  if (!head_) throw std::runtime_error("this checkpoint has no masked-LM head (cls.predictions.* or lm_head.*)");
  Tensor x = mlm_dense_->forward(hidden, Activation::gelu);
  x = at::layer_norm(x, {config_.hidden_size}, mlm_norm_w_->value(), mlm_norm_b_->value(), config_.layer_norm_eps);
  return head_->forward(x);
}

Encoded BertModel::forward(const Tensor& input_ids, const Tensor& attention_mask) const {
  // input_ids, attention_mask: (B, T)
  Encoded out;
  Tensor words = at::embedding(word_->value(), input_ids);  // (B, T, H)
  words = embed_site_->prepend(words, &out.prompt_length);  // (B, P + T, H)
  const auto B = words.size(0), S = words.size(1), H = config_.hidden_size;
  out.mask = attention_mask;
  if (out.prompt_length > 0)
    out.mask = at::cat({at::ones({B, out.prompt_length}, attention_mask.options()), attention_mask}, 1);
  // Padding tokens never influence real ones, so token-wise work skips them: the linear
  // layers, GELU and LayerNorm run on the N real tokens only. Their hidden states come
  // back as zeros.
  std::optional<Unpadded> unpadded;
  const bool all_real = out.mask.all().item<bool>();
  if (token_wise_only() && !all_real) unpadded = Unpadded::of(out.mask);
  const Unpadded* u = unpadded ? &*unpadded : nullptr;
  enter_forward(out.mask, u);
  // The prefixes are computed once per layer and forward (they may run a network), before
  // the embedding: prefix keys count as earlier tokens, so positions start after layer 0's
  // (transformers numbers BERT's tokens from the past key values' length, which is how a
  // PEFT prefix reaches it), as they do in decoders — all but positionless prefixes' (SDK 2.8).
  std::vector<KV> prefixes;
  prefixes.reserve(layers_.size());
  for (const auto& l : layers_) prefixes.push_back(l.attention->prefix(B));
  const auto offset = layers_.empty() ? std::int64_t{0} : layers_[0].attention->positioned_prefix_length() + layers_[0].attention->input_prefix_length();
  if (S + offset > max_tokens())
    throw std::runtime_error("sequence of " + std::to_string(S) + " tokens" + (offset > 0 ? " after " + std::to_string(offset) + " prefix keys" : std::string()) +
                             " exceeds the " + std::to_string(max_tokens()) + " positions of the model");
  Tensor positions = at::arange(offset, offset + S, input_ids.options()).unsqueeze(0);  // (1, S)
  if (config_.model_type == "roberta") {
    // RoBERTa numbers real tokens from pad_token_id + 1 and gives padding pad_token_id
    // (from the ids; with prompt tokens, from the embeddings: all positions count).
    const auto pad = config_.pad_token_id;
    if (out.prompt_length == 0) {
      Tensor real = input_ids.ne(pad).to(at::kLong);  // (B, S)
      positions = (at::cumsum(real, 1) + offset) * real + pad;
    } else {
      positions = positions + pad + 1;
    }
  }
  Tensor x = words + at::embedding(position_->value(), positions) +  // (B or 1, S, H)
             token_type_->value()[0];                                  // single-segment input
  x = at::layer_norm(x, {H}, embed_norm_w_->value(), embed_norm_b_->value(), config_.layer_norm_eps);
  x = tessera::dropout(x, config_.hidden_dropout, training_);
  x = embed_site_->enter(x);
  if (u) x = u->rows(x);  // (N, H)
  // With gradient checkpointing each layer runs again in backward (architectures/recompute.h),
  // after forward returned: what it reads is held by value.
  const bool recompute = gradient_checkpointing() && training_ && at::GradMode::is_enabled();
  auto shared_u = unpadded ? std::make_shared<Unpadded>(*unpadded) : nullptr;
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    const KV& prefix = prefixes[i];  // it sets the mask's length too
    Tensor mask;  // undefined when every key is real
    const auto P = prefix_keys(l, prefix);
    if (!all_real) mask = P > 0 ? at::cat({at::ones({B, P}, out.mask.options()), out.mask}, 1) : out.mask;
    auto layer = [this, &l, mask, shared_u](const Tensor& x, const KV& prefix) {
      return l.layer->run(x, [&](const Tensor& h, const Tensor& kept) {
        return kept.defined() ? routed_layer(l, h, kept, mask, prefix) : layer_forward(l, h, mask, prefix, shared_u.get());
      });
    };
    // Recomputed: the prefix, which may carry a gradient, goes in as extras.
    x = !recompute ? layer(x, prefix) : recomputed_layer(x, prefix_extras(prefix), [this, layer, full_mask = out.mask, shared_u](const Tensor& h, const std::vector<Tensor>& e) {
      if (at::GradMode::is_enabled()) enter_forward(full_mask, shared_u.get());
      return layer(h, prefix_of(e));
    });
  }
  out.hidden = output_site_->apply(u ? u->padded(x) : x);  // (B, S, H)
  return out;
}

}  // namespace tessera

#include "architectures/decoder.h"

#include "architectures/attention.h"
#include "formats/checkpoint.h"
#include "formats/gguf_llama.h"
#include "formats/json_file.h"
#include "architectures/functional.h"
#include "architectures/recompute.h"

#include <tessera/dropout.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <optional>

namespace tessera {
namespace {

// Rotary scaling, from `rope_parameters` (transformers ≥ 5) or `rope_theta` + `rope_scaling`.
RopeConfig rope_from(const JsonFields& top, const nlohmann::json& j, std::int64_t max_positions) {
  RopeConfig r;
  static const nlohmann::json none = nlohmann::json::object();
  const char* key = j.contains("rope_parameters") && !j["rope_parameters"].is_null() ? "rope_parameters"
                    : j.contains("rope_scaling") && !j["rope_scaling"].is_null()     ? "rope_scaling"
                                                                                     : nullptr;
  const JsonFields p(key ? j[key] : none, top.path(), key ? std::string(key) + "." : "");
  r.theta = p.positive_or("rope_theta", top.positive_or("rope_theta", r.theta));
  r.type = p.string_or("rope_type", p.string_or("type", "default"));
  r.factor = p.positive_or("factor", 1.0);
  r.low_freq_factor = p.positive_or("low_freq_factor", r.low_freq_factor);
  r.high_freq_factor = p.positive_or("high_freq_factor", r.high_freq_factor);
  r.original_max_positions = p.size_or("original_max_position_embeddings", max_positions);
  if (r.type != "default" && r.type != "linear" && r.type != "dynamic" && r.type != "llama3" && r.type != "yarn")
    p.fail("rope_type", "'" + r.type + "' is not supported (supported: default, linear, dynamic, llama3, yarn)");
  if (r.type == "llama3" && r.low_freq_factor == r.high_freq_factor) p.fail("low_freq_factor", "must differ from high_freq_factor");
  if (r.type == "yarn") {  // Peng et al. 2023, arXiv:2309.00071, with transformers' defaults
    if (!p.has("factor")) r.factor = static_cast<double>(max_positions) / static_cast<double>(r.original_max_positions);
    r.beta_fast = p.positive_or("beta_fast", 32.0);
    r.beta_slow = p.positive_or("beta_slow", 1.0);
    r.truncate = p.bool_or("truncate", true);
    auto mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    const double m = p.number_or("mscale", 0.0), m_all = p.number_or("mscale_all_dim", 0.0);
    r.attention_factor = p.number_or("attention_factor", m != 0 && m_all != 0 ? mscale(r.factor, m) / mscale(r.factor, m_all) : mscale(r.factor, 1.0));
  }
  if (top.number_or("partial_rotary_factor", p.number_or("partial_rotary_factor", 1.0)) != 1.0)
    throw std::runtime_error(top.path() + ": partial_rotary_factor is not supported");
  return r;
}

Tensor rotate_half(const Tensor& x) {  // (…, hd): [x1, x2] -> [-x2, x1]
  auto halves = x.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}

}  // namespace

DecoderConfig DecoderConfig::from_json_file(const std::string& path) { return from_json(read_json_file(path), path); }

DecoderConfig DecoderConfig::of(const std::string& dir_or_gguf) {
  if (is_gguf_file(dir_or_gguf)) return from_json(llama_config_from_gguf(*GgufFile::open(dir_or_gguf)), dir_or_gguf);
  return from_json_file((std::filesystem::path(dir_or_gguf) / "config.json").string());
}

DecoderConfig DecoderConfig::from_json(const nlohmann::json& j, const std::string& path) {
  const JsonFields f(j, path);
  DecoderConfig c;
  c.model_type = f.string_or("model_type", "");
  const bool llama_like = c.model_type == "llama" || c.model_type == "mistral" || c.model_type == "qwen2";
  c.gpt2 = c.model_type == "gpt2";
  if (!c.gpt2 && !llama_like)
    throw std::runtime_error(path + ": model_type '" + c.model_type + "' is not a supported decoder (supported: gpt2, llama, mistral, qwen2)");
  if (c.gpt2) {
    c.vocab_size = f.size("vocab_size");
    c.hidden_size = f.size("n_embd");
    c.num_layers = f.size("n_layer");
    c.num_heads = f.size("n_head");
    c.num_kv_heads = c.num_heads;
    c.intermediate_size = f.size_or("n_inner", 4 * c.hidden_size);
    c.max_positions = f.size("n_positions");
    c.norm_eps = f.nonnegative_or("layer_norm_epsilon", 1e-5);
    c.activation = f.string_or("activation_function", "gelu_new");
    c.hidden_dropout = f.probability_or("resid_pdrop", 0.1);
    c.embed_dropout = f.probability_or("embd_pdrop", 0.1);
    c.attention_dropout = f.probability_or("attn_pdrop", 0.1);
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
    if (f.bool_or("scale_attn_by_inverse_layer_idx", false)) throw std::runtime_error(path + ": scale_attn_by_inverse_layer_idx is not supported");
    if (!f.bool_or("scale_attn_weights", true)) throw std::runtime_error(path + ": scale_attn_weights = false is not supported");
    if (c.hidden_size % c.num_heads != 0) throw std::runtime_error(path + ": n_embd is not a multiple of n_head");
  } else {
    c.vocab_size = f.size("vocab_size");
    c.hidden_size = f.size("hidden_size");
    c.num_layers = f.size("num_hidden_layers");
    c.num_heads = f.size("num_attention_heads");
    c.num_kv_heads = f.size_or("num_key_value_heads", c.num_heads);
    c.intermediate_size = f.size("intermediate_size");
    c.max_positions = f.size("max_position_embeddings");
    c.norm_eps = f.nonnegative_or("rms_norm_eps", 1e-6);
    c.activation = f.string_or("hidden_act", "silu");
    c.attention_dropout = f.probability_or("attention_dropout", 0.0);
    // Qwen2 always has q/k/v biases; LLaMA's attention_bias covers q, k, v and o.
    const bool attention_bias = f.bool_or("attention_bias", false);
    c.qkv_bias = c.model_type == "qwen2" || attention_bias;
    c.o_bias = c.model_type != "qwen2" && attention_bias;
    c.mlp_bias = f.bool_or("mlp_bias", false);
    c.rope = rope_from(f, j, c.max_positions);
    const bool window = c.model_type != "qwen2" || f.bool_or("use_sliding_window", false);
    c.sliding_window = window ? f.int_or("sliding_window", 0) : 0;
    if (c.sliding_window < 0) f.fail("sliding_window", "must not be negative, got " + std::to_string(c.sliding_window));
  }
  c.head_dim = f.size_or("head_dim", std::max<std::int64_t>(1, c.hidden_size / c.num_heads));
  if (!c.gpt2 && c.head_dim % 2 != 0) f.fail("head_dim", "must be even for rotary embeddings, got " + std::to_string(c.head_dim));
  if (c.num_heads % c.num_kv_heads != 0) throw std::runtime_error(path + ": num_attention_heads is not a multiple of num_key_value_heads");
  const std::string act = c.activation;
  if (!known_activation(act))
    throw std::runtime_error(path + ": activation '" + act + "' is not supported");
  c.tie_word_embeddings = f.bool_or("tie_word_embeddings", c.gpt2);
  // Which layers use the sliding window: those `layer_types` names so where the config
  // has one entry per layer, otherwise all of them (left empty then).
  if (c.sliding_window > 0 && j.contains("layer_types") && j["layer_types"].is_array() &&
      j["layer_types"].size() == static_cast<std::size_t>(c.num_layers))
    for (const auto& t : j["layer_types"]) c.sliding_layers.push_back(t == "sliding_attention");
  c.bos_token_id = f.int_or("bos_token_id", -1);
  c.pad_token_id = f.int_or("pad_token_id", -1);
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {
    for (const auto& e : j["eos_token_id"]) {
      if (!e.is_number_integer()) f.fail("eos_token_id", "must be an integer or a list of them, got " + j["eos_token_id"].dump());
      c.eos_token_ids.push_back(e.get<std::int64_t>());
    }
  } else if (f.has("eos_token_id")) {
    c.eos_token_ids = {f.int_or("eos_token_id", -1)};
  }
  return c;
}

namespace {

// inv_freq_j = θ^(−2j/hd), in f32 as transformers computes it, then rescaled as the
// config's rope_scaling says. (hd / 2) f32.
Tensor rope_inverse_frequencies(const DecoderConfig& c) {
  const auto hd = c.head_dim;
  Tensor inv = 1.0 / at::pow(c.rope.theta, at::arange(0, hd, 2, at::kLong).to(at::kFloat) / static_cast<double>(hd));
  const auto& r = c.rope;
  if (r.type == "linear") inv = inv / r.factor;
  if (r.type == "llama3") {  // Llama 3.1: long wavelengths slowed by `factor`, a smooth blend between
    const double old_len = static_cast<double>(r.original_max_positions);
    const double low_wavelen = old_len / r.low_freq_factor, high_wavelen = old_len / r.high_freq_factor;
    Tensor wavelen = 2 * M_PI / inv;
    Tensor scaled = at::where(wavelen > low_wavelen, inv / r.factor, inv);
    Tensor smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    Tensor blended = (1 - smooth) * scaled / r.factor + smooth * scaled;
    Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    inv = at::where(medium, blended, scaled);
  }
  if (r.type == "yarn") {
    // Dimensions that turn fewer than beta_slow times over the trained length are
    // interpolated (inv / factor), those turning more than beta_fast times keep their
    // frequency, with a linear ramp between.
    const double d = static_cast<double>(hd), old_len = static_cast<double>(r.original_max_positions);
    auto dim_of = [&](double rotations) { return d * std::log(old_len / (rotations * 2 * M_PI)) / (2 * std::log(r.theta)); };
    double low = dim_of(r.beta_fast), high = dim_of(r.beta_slow);
    if (r.truncate) low = std::floor(low), high = std::ceil(high);
    low = std::max(low, 0.0), high = std::min(high, d - 1);
    if (low == high) high += 0.001;  // a ramp of zero width
    Tensor ramp = ((at::arange(hd / 2, at::kFloat) - low) / (high - low)).clamp(0, 1);  // (hd / 2): 0 keeps, 1 interpolates
    inv = inv / r.factor * ramp + inv * (1 - ramp);
  }
  return inv;
}

}  // namespace

std::unique_ptr<DecoderModel> DecoderModel::load(const std::string& dir, c10::TensorOptions options, bool keep_file_blocks) {
  std::unique_ptr<DecoderModel> m(new DecoderModel());
  m->config_ = DecoderConfig::of(dir);
  const auto& c = m->config_;
  Checkpoint file = Checkpoint::open(dir);
  // *ForCausalLM checkpoints nest the body under transformer. (GPT-2) or model. (LLaMA).
  const std::string body = c.gpt2 ? "transformer." : "model.";
  const std::string P = file.contains(body + (c.gpt2 ? "wte.weight" : "embed_tokens.weight")) ? body : "";
  const auto H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size, hd = c.head_dim;
  const auto nq = c.num_heads * hd, nkv = c.num_kv_heads * hd;
  // A tensor under its canonical and HF names; GPT-2's Conv1D stores (in, out): transposed (a
  // view) to the (out, in) every linear site uses. `blocks` with keep_file_blocks: a GGUF's
  // quantized layer weight stays the file's blocks (t: its shape, no memory), never dense here.
  auto tensor = [&](const std::string& canonical, const std::string& hf, std::vector<int64_t> shape, bool conv1d = false, bool blocks = false) {
    if (conv1d) std::swap(shape[0], shape[1]);
    auto stored = blocks && keep_file_blocks ? file.take_blocks(P + hf, shape, options) : nullptr;
    Tensor t = stored ? at::empty(shape, options.device(at::kMeta)) : file.take(P + hf, shape, options);
    auto* site = m->held_by(P + hf, m->param(canonical, P + hf, conv1d && t.defined() ? t.t() : t), conv1d);
    if (stored) site->store(std::move(stored));
    return site;
  };
  file.check_layer_count(is_gguf_file(dir) ? dir : (std::filesystem::path(dir) / "config.json").string(), c.gpt2 ? "n_layer" : "num_hidden_layers", c.num_layers, P + (c.gpt2 ? "h." : "layers."));
  const std::string word = c.gpt2 ? "wte" : "embed_tokens";
  m->word_ = tensor("embed.word.weight", word + ".weight", {V, H});
  if (c.gpt2) m->position_ = tensor("embed.position.weight", "wpe.weight", {c.max_positions, H});
  m->embed_site_ = std::make_unique<EmbeddingSiteImpl>("embed", P + word, H);
  m->output(P + (c.gpt2 ? "ln_f" : "norm"), H);

  for (std::int64_t i = 0; i < c.num_layers; ++i) {
    const std::string cn = "layers." + std::to_string(i), hf = (c.gpt2 ? "h." : "layers.") + std::to_string(i);
    auto lin = [&](const std::string& cname, const std::string& hname, std::int64_t out, std::int64_t in, bool bias) {
      auto* w = tensor(cn + "." + cname + ".weight", hf + "." + hname + ".weight", {out, in}, c.gpt2, true);
      auto* b = bias ? tensor(cn + "." + cname + ".bias", hf + "." + hname + ".bias", {out}) : nullptr;
      return m->linear(cn + "." + cname, P + hf + "." + hname, w, b);
    };
    Layer l{};
    if (c.gpt2) {
      l.qkv = lin("attn.qkv", "attn.c_attn", 3 * H, H, true);
      m->fused_qkv_views(l, cn, P + hf + ".attn.c_attn");
      l.o = lin("attn.o", "attn.c_proj", H, H, true);
      l.up = lin("mlp.up", "mlp.c_fc", I, H, true);
      l.down = lin("mlp.down", "mlp.c_proj", H, I, true);
      l.norm1_w = tensor(cn + ".attn.norm.weight", hf + ".ln_1.weight", {H});
      l.norm1_b = tensor(cn + ".attn.norm.bias", hf + ".ln_1.bias", {H});
      l.norm2_w = tensor(cn + ".mlp.norm.weight", hf + ".ln_2.weight", {H});
      l.norm2_b = tensor(cn + ".mlp.norm.bias", hf + ".ln_2.bias", {H});
    } else {
      l.q = lin("attn.q", "self_attn.q_proj", nq, H, c.qkv_bias);
      l.k = lin("attn.k", "self_attn.k_proj", nkv, H, c.qkv_bias);
      l.v = lin("attn.v", "self_attn.v_proj", nkv, H, c.qkv_bias);
      share_input({l.q, l.k, l.v});
      l.o = lin("attn.o", "self_attn.o_proj", H, nq, c.o_bias);
      l.gate = lin("mlp.gate", "mlp.gate_proj", I, H, c.mlp_bias);
      l.up = lin("mlp.up", "mlp.up_proj", I, H, c.mlp_bias);
      share_input({l.gate, l.up});
      l.down = lin("mlp.down", "mlp.down_proj", H, I, c.mlp_bias);
      l.norm1_w = tensor(cn + ".attn.norm.weight", hf + ".input_layernorm.weight", {H});
      l.norm2_w = tensor(cn + ".mlp.norm.weight", hf + ".post_attention_layernorm.weight", {H});
    }
    l.attn = m->sublayer(cn + ".attn", P + hf + (c.gpt2 ? ".attn" : ".self_attn"), H);
    l.mlp = m->sublayer(cn + ".mlp", P + hf + ".mlp", H);
    // Prefix keys and values are per key/value head (grouped-query attention shares them).
    l.attention = m->attention_site(cn + ".attn", P + hf + (c.gpt2 ? ".attn" : ".self_attn"), c.num_kv_heads, hd, c.num_heads);
    l.layer = m->layer_site(cn, P + hf, i);
    l.sliding = c.sliding_layers.empty() ? c.sliding_window > 0 : c.sliding_layers[static_cast<std::size_t>(i)];
    m->layers_.push_back(l);
  }
  m->final_w_ = tensor("norm.weight", c.gpt2 ? "ln_f.weight" : "norm.weight", {H});
  if (c.gpt2) m->final_b_ = tensor("norm.bias", "ln_f.bias", {H});
  // A tied head shares the embedding's parameter site: one tensor, one set of deltas.
  ParameterSiteImpl* head_w = m->word_;
  if (!c.tie_word_embeddings) head_w = m->param("head.weight", "lm_head.weight", file.take("lm_head.weight", {V, H}, options));
  // (A tied lm_head.weight that some writers store anyway is, to transformers, the embedding.)
  if (file.contains("lm_head.weight")) m->held_by("lm_head.weight", head_w);
  m->head_ = m->linear("head", "lm_head", head_w, nullptr);
  m->ignored_ = file.finish();
  if (!c.gpt2) m->inv_freq_ = rope_inverse_frequencies(c).to(options.dtype(at::kFloat));
  m->describe({c.model_type, H, c.num_layers, c.num_heads, I, V, {}, {}}, options);
  return m;
}

// GPT-2's q, k, v: row blocks of the fused c_attn weight, under HF paths no PEFT target
// matches.
void DecoderModel::fused_qkv_views(Layer& l, const std::string& cn, const std::string& c_attn) {
  const auto H = config_.hidden_size;
  LinearSiteImpl** slots[] = {&l.q, &l.k, &l.v};
  for (std::int64_t k = 0; k < 3; ++k) {
    const std::string name(1, "qkv"[k]);
    auto view = [&](ParameterSite* whole, const char* what) {
      Tensor part = whole->base().defined() ? whole->base().narrow(0, k * H, H) : Tensor();
      return own(views_, cn + ".attn." + name + "." + what, whole->hf_name() + "[" + name + "]", part);
    };
    *slots[k] = linear(cn + ".attn." + name, c_attn + "." + name, view(&l.qkv->weight(), "weight"), view(l.qkv->bias(), "bias"));
  }
  share_input({l.q, l.k, l.v});
}

std::pair<Tensor, Tensor> DecoderModel::rope_tables(const Tensor& positions, c10::ScalarType dtype) const {
  // positions (B, T) -> cos, sin (B, 1, T, hd)
  Tensor inv = inv_freq_;
  const auto& r = config_.rope;
  if (r.type == "dynamic") {
    // NTK-aware: past the trained length the base grows with the sequence seen so far.
    const double seq = static_cast<double>(positions.max().item<std::int64_t>() + 1), trained = static_cast<double>(config_.max_positions);
    if (seq > trained) {
      const double d = static_cast<double>(config_.head_dim);
      const double base = r.theta * std::pow(r.factor * seq / trained - (r.factor - 1), d / (d - 2));
      inv = 1.0 / at::pow(base, at::arange(0, config_.head_dim, 2, at::kLong).to(inv.options()) / d);
    }
  }
  Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv;  // (B, T, hd/2)
  Tensor emb = at::cat({freqs, freqs}, -1).unsqueeze(1);        // (B, 1, T, hd)
  if (r.attention_factor != 1.0) return {(emb.cos() * r.attention_factor).to(dtype), (emb.sin() * r.attention_factor).to(dtype)};
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

Tensor DecoderModel::norm(const Tensor& x, ParameterSiteImpl* w, ParameterSiteImpl* b) const {
  if (config_.gpt2) return at::layer_norm(x, {config_.hidden_size}, w->value(), b->value(), config_.norm_eps);
  return rms_norm(x, w->value(), config_.norm_eps);
}

Tensor DecoderModel::mlp(const Layer& l, const Tensor& x) const {
  return l.down->forward(ffn_hidden(l.gate, *l.up, config_.activation, x));
}

Tensor DecoderModel::attention(const Layer& l, std::size_t index, const Tensor& x, const Tensor& positions,
                               const Tensor& key_mask, const std::pair<Tensor, Tensor>& rope, const std::pair<Tensor, Tensor>& prefix,
                               KVCache* cache, bool all_real, const Unpadded* u) const {
  // x (B, T, H), or (N, H) real tokens when unpadded; key_mask (B, S) over
  // [prefix | cache | new]; returns x's layout
  const auto B = u ? u->batch : x.size(0), T = u ? u->seq : x.size(1);
  const auto nh = config_.num_heads, kvh = config_.num_kv_heads, hd = config_.head_dim;
  Tensor q, k, v;
  const bool split = l.q->has_interventions() || l.k->has_interventions() || l.v->has_interventions() ||
                     l.q->weight().has_deltas() || l.k->weight().has_deltas() || l.v->weight().has_deltas() ||
                     (l.q->bias() && (l.q->bias()->has_deltas() || l.k->bias()->has_deltas() || l.v->bias()->has_deltas()));
  if (l.qkv && split && (l.qkv->has_interventions() || l.qkv->weight().has_deltas() || l.qkv->bias()->has_deltas()))
    throw std::runtime_error(l.qkv->name() + " and its split sites " + l.q->name() + "/k/v both have interventions; the fused c_attn is used whole or split, not both in one layer");
  if (l.qkv && !split) {
    auto parts = l.qkv->forward(x).split(nh * hd, -1);
    q = parts[0], k = parts[1], v = parts[2];
  } else {
    q = l.q->forward(x), k = l.k->forward(x), v = l.v->forward(x);
  }
  if (u) q = u->padded(q), k = u->padded(k), v = u->padded(v);  // back to (B, T, ·) for attention
  q = q.view({B, T, nh, hd}).transpose(1, 2);   // (B, nh, T, hd)
  k = k.view({B, T, kvh, hd}).transpose(1, 2);  // (B, kvh, T, hd)
  v = v.view({B, T, kvh, hd}).transpose(1, 2);
  if (rope.first.defined()) {
    q = q * rope.first + rotate_half(q) * rope.second;
    k = k * rope.first + rotate_half(k) * rope.second;
  }
  // Keys: [prefix (first call only) | cached | new].
  const bool first = cache == nullptr || cache->k.size() <= index || !cache->k[index].defined();
  if (first) {  // keys: [prefix ; input prefix ; tokens]
    const auto in = l.attention->input_prefix(x);  // x (B, T, H): input prefixes keep the padded layout
    const auto weighed = l.attention->weigh_prefix(prefix, x);  // gated or routed prefixes, from the layer's input
    prepend_prefixes(k, v, {&weighed, &in});
  } else {
    k = at::cat({cache->k[index], k}, 2);
    v = at::cat({cache->v[index], v}, 2);
  }
  if (cache) {
    if (cache->k.size() <= index) cache->k.resize(index + 1), cache->v.resize(index + 1);
    cache->k[index] = k, cache->v[index] = v;
  }
  const auto S = k.size(2);
  if (key_mask.size(1) != S) throw std::runtime_error(l.attention->name() + ": attention prefixes of different lengths are not supported in a decoder");
  // Query t sits at key index S − T + t: it sees real keys not after itself (and within
  // the sliding window), and always itself, so a padding row is never empty.
  Tensor keep;  // (B, 1, T, S); undefined: the kernel's own causal mask (or none for one query) suffices
  const bool plain = all_real && !(l.sliding && S > config_.sliding_window);
  if (!plain || (T != S && T != 1)) {
    Tensor qpos = at::arange(S - T, S, positions.options()).view({T, 1}), kpos = at::arange(S, positions.options()).view({1, S});
    Tensor visible = kpos <= qpos;
    if (l.sliding) visible = visible.logical_and(qpos - kpos < config_.sliding_window);
    keep = key_mask.to(at::kBool).view({B, 1, 1, S}).logical_and(visible).logical_or(kpos == qpos);
  }
  if (kvh != nh) {  // grouped-query attention: each key/value head serves nh / kvh query heads
    k = k.repeat_interleave(nh / kvh, 1);
    v = v.repeat_interleave(nh / kvh, 1);
  }
  Tensor ctx = attend(q, k, v, keep, config_.attention_dropout, training_, *l.attention, {}, std::nullopt,
                      /*causal=*/!keep.defined() && T > 1);  // (B, nh, T, hd)
  ctx = ctx.transpose(1, 2).reshape({B, T, nh * hd});
  return l.o->forward(u ? u->rows(ctx) : ctx);
}

Tensor DecoderModel::forward(const Tensor& ids, const Tensor& mask, KVCache* cache) const {
  // ids, mask: (B, T)
  const bool first = cache == nullptr || cache->length() == 0;
  Tensor x = at::embedding(word_->value(), ids);  // (B, T, H)
  std::int64_t prompt = 0;
  if (first) x = embed_site_->prepend(x, &prompt);  // (B, P + T, H)
  const auto B = x.size(0), T = x.size(1);
  Tensor new_mask = prompt > 0 ? at::cat({at::ones({B, prompt}, mask.options()), mask}, 1) : mask;
  // Prefix keys count as earlier tokens: positions continue after them, as transformers
  // does for past key values; a positionless prefix's (SDK 2.8) do not.
  Tensor past;
  std::int64_t positionless = cache ? cache->positionless : 0;
  std::vector<std::pair<Tensor, Tensor>> prefixes;  // per layer, first call only
  if (!first) {
    past = cache->mask;
  } else {
    // Each site's prefix is evaluated once per forward (it may run a network).
    for (const auto& l : layers_) prefixes.push_back(l.attention->prefix(B));
    const auto& p0 = prefixes.empty() ? std::pair<Tensor, Tensor>{} : prefixes[0];
    const auto in0 = layers_.empty() ? 0 : layers_[0].attention->input_prefix_length();
    past = at::ones({B, (p0.first.defined() ? p0.first.size(2) : 0) + in0}, mask.options());
    positionless = layers_.empty() ? 0 : (p0.first.defined() ? p0.first.size(2) : 0) - layers_[0].attention->positioned_prefix_length();
    if (cache) cache->positionless = positionless;
  }
  Tensor key_mask = at::cat({past, new_mask}, 1);  // (B, S)
  const bool all_real = key_mask.all().item<bool>();
  Tensor positions = (at::cumsum(key_mask, 1) - 1 - positionless).clamp_min(0).narrow(1, key_mask.size(1) - T, T);  // (B, T)
  if (config_.gpt2) {
    if (positions.max().item<std::int64_t>() >= config_.max_positions)
      throw std::runtime_error("position " + std::to_string(positions.max().item<std::int64_t>()) + " exceeds n_positions " + std::to_string(config_.max_positions));
    x = x + at::embedding(position_->value(), positions);
  }
  x = tessera::dropout(x, config_.embed_dropout, training_);
  // Padding never influences real tokens, so without a cache (training, evaluation) the
  // token-wise work skips it: the layers run on the N real tokens' rows, attention alone
  // on the padded layout. Hidden states at padding come back as zeros.
  std::optional<Unpadded> unpadded;
  if (cache == nullptr && !all_real && token_wise_only()) unpadded = Unpadded::of(new_mask);
  const Unpadded* u = unpadded ? &*unpadded : nullptr;
  enter_forward(new_mask, u);  // before the embedding transforms: a gate over them reads this forward's mask
  x = embed_site_->enter(x);
  if (u) x = u->rows(x);  // (N, H)
  const auto rope = config_.gpt2 ? std::pair<Tensor, Tensor>{} : rope_tables(positions, x.scalar_type());
  // Layer i on x, with the attention site's prefix for this forward (undefined: none). It
  // captures by value: a recomputed layer runs it again in backward, after forward returned.
  auto shared_u = unpadded ? std::make_shared<Unpadded>(*unpadded) : nullptr;
  auto layer = [=](std::size_t i, const Tensor& x, const std::pair<Tensor, Tensor>& prefix) {
    const Layer& l = layers_[i];
    const Unpadded* u = shared_u.get();
    return l.layer->run(x, [&](const Tensor& h, const Tensor& kept) {
      // Routed: kept tokens attend to kept keys of this call (and to earlier keys, prefixes and
      // themselves), at their own positions; the site keeps h at the others.
      const auto S = key_mask.size(1);
      const Tensor keys = kept.defined() ? at::cat({key_mask.narrow(1, 0, S - T), key_mask.narrow(1, S - T, T) * kept.to(key_mask.scalar_type())}, 1) : key_mask;
      Tensor n1 = norm(h, l.norm1_w, l.norm1_b);
      Tensor a = tessera::dropout(attention(l, i, n1, positions, keys, rope, prefix, cache, all_real && !kept.defined(), u), config_.hidden_dropout, training_);
      Tensor h1 = h + l.attn->apply(n1, a, h, SublayerSiteImpl::identity());
      Tensor n2 = norm(h1, l.norm2_w, l.norm2_b);
      Tensor m = tessera::dropout(mlp(l, n2), config_.hidden_dropout, training_);
      return h1 + l.mlp->apply(n2, m, h1, SublayerSiteImpl::identity());
    });
  };
  const bool recompute = gradient_checkpointing() && training_ && cache == nullptr && at::GradMode::is_enabled();
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const auto prefix = prefixes.empty() ? std::pair<Tensor, Tensor>{} : prefixes[i];
    // Recomputed: the prefix, which may carry a gradient, goes in as extras; the forward
    // context is set again for the second pass.
    x = !recompute ? layer(i, x, prefix) : recomputed_layer(x, prefix_extras(prefix), [=](const Tensor& h, const std::vector<Tensor>& e) {
      if (at::GradMode::is_enabled()) enter_forward(new_mask, shared_u.get());
      return layer(i, h, prefix_of(e));
    });
  }
  if (cache) cache->mask = key_mask;
  x = norm(x, final_w_, final_b_);
  return output_site_->apply(u ? u->padded(x) : x);  // (B, P + T, H)
}

Tensor DecoderModel::logits(const Tensor& hidden) const { return head_->forward(hidden); }

}  // namespace tessera

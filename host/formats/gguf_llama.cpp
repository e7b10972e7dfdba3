#include "formats/gguf_llama.h"

#include <ATen/ATen.h>

#include <regex>

namespace tessera {
namespace {

const nlohmann::json& need(const GgufFile& f, const std::string& key) {
  if (!f.metadata().contains(key)) throw GgufError(f.path(), "", "metadata has no '" + key + "', which a LLaMA model needs");
  return f.metadata()[key];
}

// The inverse of llama.cpp's per-head row order for rotary q and k: (h, d/2, 2, in) → (h, 2, d/2, in).
at::Tensor unpermute(const at::Tensor& w, std::int64_t heads) {
  const std::int64_t rows = w.size(0);
  return w.reshape({heads, rows / heads / 2, 2, -1}).transpose(1, 2).reshape(w.sizes()).contiguous();
}

}  // namespace

nlohmann::json llama_config_from_gguf(const GgufFile& f) {
  const auto arch = need(f, "general.architecture").get<std::string>();
  if (arch != "llama") throw GgufError(f.path(), "", "general.architecture is '" + arch + "': only llama GGUF files are read as a model");
  const std::int64_t hidden = need(f, "llama.embedding_length").get<std::int64_t>(), heads = need(f, "llama.attention.head_count").get<std::int64_t>();
  nlohmann::json c = {{"model_type", "llama"},
                      {"architectures", nlohmann::json::array({"LlamaForCausalLM"})},
                      {"hidden_act", "silu"},
                      {"hidden_size", hidden},
                      {"intermediate_size", need(f, "llama.feed_forward_length")},
                      {"num_hidden_layers", need(f, "llama.block_count")},
                      {"num_attention_heads", heads},
                      {"num_key_value_heads", f.metadata().value("llama.attention.head_count_kv", nlohmann::json(heads))},
                      {"head_dim", f.metadata().value("llama.rope.dimension_count", nlohmann::json(hidden / heads))},
                      {"rms_norm_eps", need(f, "llama.attention.layer_norm_rms_epsilon")},
                      {"rope_theta", f.metadata().value("llama.rope.freq_base", nlohmann::json(10000.0))},
                      {"max_position_embeddings", need(f, "llama.context_length")},
                      {"tie_word_embeddings", !f.has("output.weight")}};
  if (f.metadata().contains("llama.vocab_size")) c["vocab_size"] = f.metadata()["llama.vocab_size"];
  else c["vocab_size"] = need(f, "tokenizer.ggml.tokens").size();
  for (const auto& [ours, theirs] : {std::pair{"bos_token_id", "tokenizer.ggml.bos_token_id"}, {"eos_token_id", "tokenizer.ggml.eos_token_id"},
                                     {"pad_token_id", "tokenizer.ggml.padding_token_id"}, {"unk_token_id", "tokenizer.ggml.unknown_token_id"}})
    if (f.metadata().contains(theirs)) c[ours] = f.metadata()[theirs];
  return c;
}

std::optional<std::string> hf_name_from_gguf(const std::string& n) {
  static const std::map<std::string, std::string> kTop = {
      {"token_embd.weight", "model.embed_tokens.weight"}, {"output_norm.weight", "model.norm.weight"}, {"output.weight", "lm_head.weight"}};
  static const std::map<std::string, std::string> kLayer = {
      {"attn_q", "self_attn.q_proj"}, {"attn_k", "self_attn.k_proj"}, {"attn_v", "self_attn.v_proj"}, {"attn_output", "self_attn.o_proj"},
      {"ffn_gate", "mlp.gate_proj"}, {"ffn_up", "mlp.up_proj"}, {"ffn_down", "mlp.down_proj"},
      {"attn_norm", "input_layernorm"}, {"ffn_norm", "post_attention_layernorm"}};
  if (const auto it = kTop.find(n); it != kTop.end()) return it->second;
  static const std::regex layer(R"(blk\.(\d+)\.([a-z_]+)\.(weight|bias))");
  std::smatch m;
  if (!std::regex_match(n, m, layer)) return std::nullopt;
  const auto it = kLayer.find(m[2].str());
  if (it == kLayer.end()) return std::nullopt;
  return "model.layers." + m[1].str() + "." + it->second + "." + m[3].str();
}

at::Tensor hf_tensor_from_gguf(const GgufFile& f, const std::string& n) {
  at::Tensor w = f.dequantize(n);
  static const std::regex rotary(R"(blk\.\d+\.attn_(q|k)\.weight)");
  std::smatch m;
  if (!std::regex_match(n, m, rotary)) return w;
  const std::int64_t heads = m[1].str() == "q" ? need(f, "llama.attention.head_count").get<std::int64_t>()
                                                : f.metadata().value("llama.attention.head_count_kv", need(f, "llama.attention.head_count")).get<std::int64_t>();
  if (w.size(0) % (2 * heads) != 0) throw GgufError(f.path(), n, "has " + std::to_string(w.size(0)) + " rows, not a whole number of rotary pairs for " + std::to_string(heads) + " heads");
  return unpermute(w, heads);
}

}  // namespace tessera
